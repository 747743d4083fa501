"""Documents -> fixed-length packed sequences in the form the model consumes (``FusionBatch``).

A document is one image-caption pair (or one text-only sample), laid out as

    caption-first :  <s> caption <BOI> image-tokens <EOI> </s>
    image-first   :  <s> <BOI> image-tokens <EOI> caption </s>
    text-only     :  <s> text </s>
    VLM picture   :  <s> <image> x P caption </s>   (LLaVA-Fusion: the frozen vision tower's input)
    editing       :  <s> <BOI> source <EOI> instruction <BOI> target <EOI> </s>
                     (the source clean and without loss; LM loss on the text only with
                     ``data.edit_instruction_loss``)

Several documents are packed greedily into one sequence of ``seq_length``;
a document that does not fit in what is left starts the next sequence and the
tail is padding (its own document, no loss). Loss is taken on text positions
whose next token is text of the same document, except the one predicting
<BOI> (the model does not learn to open an image; generation inserts it).

Each batch also carries its routing plan (``FusionBatch.route_plan``), built here on
the CPU of the loader worker, so the training forward reads no token count back
from the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megafusion.config.schema import Config
from megafusion.model.batch import FusionBatch
from megafusion.model.routing import RoutePlan


@dataclass
class Document:
    tokens: list[int]
    """Token ids; image positions hold ``image_token_placeholder`` (-1)."""
    latent: np.ndarray | None = None
    """[C, h, w] clean latent of this document's image (None for text-only)."""
    image_start: int = -1
    """Index in ``tokens`` of the first image token."""
    key: str = ""
    """Provenance (source shard#key) of the image."""
    caption_after: bool = False
    """The image comes first and its (non-empty) caption follows: an understanding example."""
    source: tuple[int, int] | None = None
    """(shard index in the loader's sorted shard list, member index in it): where a saved loader state re-reads
    the latent from instead of storing it."""
    epoch: int = -1
    """The loader epoch the image was read in (a pending document can be packed in the next epoch's rows)."""
    pixels: np.ndarray | None = None
    """[3, H, W] float32 normalised picture of a VLM-picture document (its placeholders are text tokens)."""
    edit_source: np.ndarray | None = None
    """[C, h, w] clean latent of an editing triple's source image (its positions hold -2; ``latent`` is the
    target's, at -1)."""
    lm_loss: bool = True
    """False: no LM loss anywhere in this document (editing triples without ``data.edit_instruction_loss``)."""

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class SpecialTokens:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    image_placeholder: int = -1
    """A LLaVA's ``<image>`` id (LLaVA-Fusion), never a loss target; -1 without a VLM."""


def make_document(
    caption_ids: list[int],
    latent: np.ndarray | None,
    tokens_per_image: int,
    sp: SpecialTokens,
    caption_first: bool,
    max_len: int,
) -> Document:
    """Lay out one pair; the caption is cut if the whole document would exceed ``max_len``."""
    if latent is None:
        text = caption_ids[: max(0, max_len - 2)]
        return Document([sp.bos, *text, sp.eos])
    room = max_len - tokens_per_image - 4  # <s> <BOI> <EOI> </s>
    if room < 0:
        raise ValueError(
            f"data.seq_length={max_len} cannot hold one image of {tokens_per_image} tokens plus 4 special tokens"
        )
    cap = caption_ids[:room]
    image = [-1] * tokens_per_image
    if caption_first:
        toks = [sp.bos, *cap, sp.boi, *image, sp.eoi, sp.eos]
        start = 2 + len(cap)
    else:
        toks = [sp.bos, sp.boi, *image, sp.eoi, *cap, sp.eos]
        start = 2
    return Document(toks, latent, start, caption_after=not caption_first and bool(cap))


SOURCE_PLACEHOLDER = -2
"""Token value of an editing source's image positions in ``Document.tokens`` (the target's are -1)."""


def make_edit_document(
    instruction_ids: list[int],
    source: np.ndarray | None,
    target: np.ndarray,
    tokens_per_image: int,
    sp: SpecialTokens,
    max_len: int,
    instruction_loss: bool = False,
) -> Document:
    """One editing triple; ``source`` None (dropped for image guidance) leaves instruction -> target, a
    caption-first pair. The instruction is cut to fit."""
    if source is None:
        doc = make_document(instruction_ids, target, tokens_per_image, sp, True, max_len)
        doc.lm_loss = instruction_loss
        return doc
    room = max_len - 2 * tokens_per_image - 6  # <s> <BOI> <EOI> <BOI> <EOI> </s>
    if room < 0:
        raise ValueError(
            f"data.seq_length={max_len} cannot hold an editing triple: 2 images of {tokens_per_image} tokens + 6"
        )
    src, tgt = [SOURCE_PLACEHOLDER] * tokens_per_image, [-1] * tokens_per_image
    instr = instruction_ids[:room]
    toks = [sp.bos, sp.boi, *src, sp.eoi, *instr, sp.boi, *tgt, sp.eoi, sp.eos]
    return Document(toks, target, 4 + tokens_per_image + len(instr), edit_source=source, lm_loss=instruction_loss)


def make_vlm_document(
    caption_ids: list[int], pixels: np.ndarray, placeholders: int, sp: SpecialTokens, max_len: int
) -> Document:
    """A picture for the VLM's vision tower and its caption, laid out as LLaVA reads it (caption cut to fit)."""
    room = max_len - placeholders - 2  # <s> ... </s>
    if room < 0:
        raise ValueError(f"data.seq_length={max_len} cannot hold one picture of {placeholders} placeholders + 2")
    toks = [sp.bos, *[sp.image_placeholder] * placeholders, *caption_ids[:room], sp.eos]
    return Document(toks, pixels=pixels)


@dataclass
class Packer:
    """Greedy packer: ``add`` documents, take full rows with ``pop_row``."""

    seq_length: int
    sp: SpecialTokens
    rows: list[list[Document]] = field(default_factory=list)
    current: list[Document] = field(default_factory=list)
    used: int = 0

    def add(self, doc: Document) -> None:
        if self.used + len(doc) > self.seq_length:
            self.rows.append(self.current)
            self.current, self.used = [], 0
        self.current.append(doc)
        self.used += len(doc)

    def ready(self) -> int:
        return len(self.rows)

    def pop_row(self) -> list[Document]:
        return self.rows.pop(0)


def sequence_shards(cfg: Config) -> int:
    """Sequence-parallel shards of the run's residual stream: its TP size under sequence parallelism, else 1
    (what ``ParallelContext.current`` decides), so a batch's plan holds the local route of every TP rank."""
    tp = cfg.parallel.tensor_parallel
    return tp if cfg.parallel.sequence_parallel and tp > 1 else 1


def rows_to_batch(rows: list[list[Document]], seq_length: int, sp: SpecialTokens, sp_shards: int = 1) -> FusionBatch:
    """Packed rows -> FusionBatch with ids, image/document/position ids, labels, loss mask, clean latents,
    and the routing plan for ``sp_shards`` sequence-parallel shards (:func:`sequence_shards`)."""
    b, s = len(rows), seq_length
    ids = torch.full((b, s), sp.pad, dtype=torch.long)
    image_ids = torch.full((b, s), -1, dtype=torch.long)
    doc_ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.zeros(b, s, dtype=torch.long)
    latents: list[np.ndarray] = []
    clean: list[bool] = []  # per image: an editing source (no noise, no loss)
    no_lm = torch.zeros(b, s, dtype=torch.bool)
    pictures: list[np.ndarray] = []  # VLM pictures in row-major order: the order their placeholders fill
    for r, row in enumerate(rows):
        cur = 0
        for d, doc in enumerate(row):
            n = len(doc)
            toks = torch.tensor(doc.tokens, dtype=torch.long)
            is_img = toks < 0
            ids[r, cur : cur + n] = torch.where(is_img, torch.zeros_like(toks), toks)
            if doc.edit_source is not None:  # the source appears first: it is the lower image id
                image_ids[r, cur : cur + n][toks == SOURCE_PLACEHOLDER] = len(latents)
                latents.append(doc.edit_source)
                clean.append(True)
            if doc.latent is not None:
                image_ids[r, cur : cur + n][toks == -1] = len(latents)
                latents.append(doc.latent)
                clean.append(False)
            if not doc.lm_loss:
                no_lm[r, cur : cur + n] = True
            if doc.pixels is not None:
                pictures.append(doc.pixels)
            doc_ids[r, cur : cur + n] = d
            pos[r, cur : cur + n] = torch.arange(n)
            cur += n
        if cur < s:  # padding: one more document, causal over itself, no loss
            doc_ids[r, cur:] = len(row)
            pos[r, cur:] = torch.arange(s - cur)
    is_text = image_ids < 0
    labels = torch.roll(ids, -1, 1)
    next_text = torch.roll(is_text, -1, 1)
    same_doc = doc_ids == torch.roll(doc_ids, -1, 1)
    not_pad = torch.zeros(b, s, dtype=torch.bool)
    for r, row in enumerate(rows):
        not_pad[r, : sum(len(d) for d in row)] = True
    loss_mask = is_text & next_text & same_doc & not_pad & (labels != sp.boi) & (ids != sp.eos)
    if sp.image_placeholder >= 0:
        loss_mask &= labels != sp.image_placeholder
    loss_mask &= ~no_lm
    loss_mask[:, -1] = False
    lat = torch.from_numpy(np.stack(latents).astype(np.float32)) if latents else None
    after = torch.tensor(
        [
            a
            for row in rows
            for d in row
            for a in ([False] if d.edit_source is not None else [])
            + ([d.caption_after] if d.latent is not None else [])
        ],
        dtype=torch.bool,
    )
    plan = RoutePlan.build(image_ids, sp_shards)  # on the CPU here: no sync in the model's forward
    pix = torch.from_numpy(np.stack(pictures)) if pictures else None
    return FusionBatch(
        ids,
        image_ids,
        pos,
        doc_ids,
        lat,
        None,
        labels,
        loss_mask.float(),
        caption_after=after,
        pixel_values=pix,
        clean_images=torch.tensor(clean, dtype=torch.bool) if any(clean) else None,
        route_plan=plan,
    )
