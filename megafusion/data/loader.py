"""Packed training micro-batches from latent shards, split over data-parallel ranks and loader workers.

Determinism is the contract: the micro-batches a DP rank sees are a pure
function of (data.path, seed, DP rank, DP size, data.num_workers, epoch), so
  * every TP and PP rank of one DP replica reads the same batches;
  * the union over ranks and workers of one epoch is the dataset, without overlap
    (shards are dealt round-robin to the rank x worker slots when there are
    enough of them, single samples otherwise);
  * a resumed run continues with exactly the micro-batch after the last consumed one.
Within a slot, an epoch reads its shards in the epoch's seeded shard order, each in
archive order, through a streaming shuffle buffer of ``data.shuffle_buffer`` samples
(per logical worker), then packs them greedily; the packer carries over epochs.
Logical worker w of a rank produces that rank's micro-batches w, w + W, w + 2W, ...;
``torch.utils.data.DataLoader`` returns its worker processes' outputs round-robin,
and process i plays logical worker (i + start_batch) % W, which restores the order.

Resume without replay: every batch carries ``loader_state``, its logical worker's
position after that batch (JSON, see :mod:`megafusion.data.loader_state`): it names
the buffered and pending samples by (shard, member) instead of holding their latents.
A worker given such a state (``resume``) re-reads just those samples and skips to its
member offset in the current shard without decoding what it passes: it decodes at most
``data.shuffle_buffer`` + one micro-batch's documents, at any step. A worker given no
state replays (builds and drops the batches it had produced): the fallback for
checkpoints saved without a loader state.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megafusion.config.schema import Config
from megafusion.data.latent_cache import BadSample, expand_inputs, iter_tar_groups
from megafusion.data.loader_state import (
    decode_rng,
    encode_rng,
    fresh_state,
    pack_rng,
    shuffle_rng,
    text_order_rng,
    units_for,
)
from megafusion.data.packing import (
    Document,
    Packer,
    SpecialTokens,
    make_document,
    make_edit_document,
    make_vlm_document,
    rows_to_batch,
    sequence_shards,
)
from megafusion.data.vlm_pictures import read_pixels, vlm_pictures
from megafusion.model.batch import FusionBatch


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not path:
        raise ValueError("data.tokenizer is empty: set it to a local Hugging Face tokenizer directory")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def special_tokens(tokenizer, cfg: Config) -> SpecialTokens:
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {cfg.data.tokenizer!r} defines no bos/eos token")
    return SpecialTokens(bos=bos, eos=eos, pad=pad, boi=cfg.model.boi_token_id, eoi=cfg.model.eoi_token_id)


def _latent(data: bytes) -> np.ndarray:
    latent = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(latent, np.ndarray) or latent.ndim != 3:
        raise BadSample("bad_latent")
    return latent


def read_edit_source(parts: dict[str, bytes]) -> np.ndarray | None:
    """An editing triple's source latent (``src.npy``; its target is ``tgt.npy``), None for a plain pair."""
    return _latent(parts["src.npy"]) if "tgt.npy" in parts and "src.npy" in parts else None


def read_latent_sample(parts: dict[str, bytes]) -> tuple[np.ndarray, str, dict]:
    """Explicit decoders: numpy without pickle, UTF-8, JSON. An editing triple (``src.npy``/``tgt.npy``, from
    ``tools/precompute_latents.py --edit``) gives its target here and its source by ``read_edit_source``."""
    key = "tgt.npy" if "tgt.npy" in parts else "npy"
    if key not in parts or "txt" not in parts:
        raise BadSample("missing_latent_or_caption")
    latent = _latent(parts[key])
    meta = json.loads(parts["json"].decode("utf-8")) if "json" in parts else {}
    return latent, parts["txt"].decode("utf-8"), meta


class Sample(NamedTuple):
    shard: int  # index in the sorted shard list
    member: int  # sample index in the shard's archive order
    key: str  # url#key
    latent: np.ndarray
    caption: str
    pixels: np.ndarray | None = None  # uint8 [3, P, P] picture for a LLaVA's vision tower (KEY.pixels.npy)
    source: np.ndarray | None = None  # an editing triple's source latent (the target is ``latent``)


class TextReader:
    """A slot's text-only documents of one epoch, cycled; position (cycle, shard, member, counter) kept."""

    def __init__(self, urls: list[str], seed: int, epoch: int, slot: int, slots: int, state: dict | None = None):
        self.urls, self.seed, self.epoch, self.slot, self.slots = urls, seed, epoch, slot, slots
        st = state or {"cycle": 0, "q": 0, "i": 0, "j": 0, "produced": 0}
        self.cycle, self.q, self.i, self.j, self.produced = st["cycle"], st["q"], st["i"], st["j"], st["produced"]
        self._it = self._texts()

    def state(self) -> dict:
        return {"cycle": self.cycle, "q": self.q, "i": self.i, "j": self.j, "produced": self.produced}

    def next(self) -> str:
        return next(self._it)

    def _texts(self) -> Iterator[str]:
        n, slot, slots = len(self.urls), self.slot, self.slots
        by_shard = n >= slots
        while True:
            order = list(range(n))
            text_order_rng(self.seed, self.epoch, self.cycle).shuffle(order)
            mine = order[slot::slots] if by_shard else order
            while self.q < len(mine):
                try:
                    for idx, (_key, parts) in enumerate(iter_tar_groups(self.urls[mine[self.q]])):
                        if idx < self.i:
                            continue
                        self.i = idx + 1
                        take = by_shard or self.j % slots == slot
                        self.j += 1
                        if take and "txt" in parts:
                            self.produced += 1
                            yield parts["txt"].decode("utf-8", errors="replace")
                except BadSample:
                    pass
                self.q, self.i = self.q + 1, 0
            if self.produced == 0:
                raise ValueError(f"data.text_path gives worker slot {slot} no text sample")
            self.cycle, self.q, self.i, self.j, self.produced = self.cycle + 1, 0, 0, 0, 0


class SlotReader:
    """One logical worker's pipeline (units -> shuffle buffer -> packer -> micro-batches).

    All of its position lives in attributes updated as it reads, so :meth:`state` taken
    when a batch is emitted is exactly the position after that batch, and a reader
    built from that state continues with the same batches, bitwise.
    """

    def __init__(
        self,
        cfg: Config,
        shards: list[str],
        slot: int,
        slots: int,
        worker: int,
        dp_rank: int = 0,
        *,
        state: dict | None = None,
        max_epochs: int | None = None,
    ):
        self.cfg, self.shards, self.slot, self.slots, self.worker = cfg, shards, slot, slots, worker
        self.dp_rank, self.max_epochs = dp_rank, max_epochs
        self.tok = load_tokenizer(cfg.data.tokenizer)
        self.sp = special_tokens(self.tok, cfg)
        self.vlm = vlm_pictures(cfg)  # LLaVA-Fusion: image-first pairs with pictures go to the VLM's tower
        if self.vlm is not None:
            self.sp.image_placeholder = self.vlm.image_token_id
            if cfg.data.seq_length < self.vlm.placeholders + 2:
                raise ValueError(
                    f"data.seq_length={cfg.data.seq_length} cannot hold one LLaVA picture "
                    f"({self.vlm.placeholders} <image> placeholders + <s> </s>; data.vlm_understanding=true)"
                )
        self.T = cfg.model.image.tokens_per_image
        img = cfg.model.image
        self.want = (img.latent_channels, img.latent_size, img.latent_size)
        self.ratio = cfg.data.text_ratio if cfg.data.text_path else 0.0
        self.text_urls = expand_inputs(cfg.data.text_path) if self.ratio > 0 else []
        self.decodes = 0  # read_latent_sample calls of this reader (restore included)
        self.restore_decodes = 0  # of those, the ones made to rebuild a saved state
        self._restore(state or fresh_state(slot, slots, worker))

    # -------------------------------------------------------------- state
    def state(self) -> dict:
        """JSON position after the last emitted batch: references and token ids, no latents."""
        pk = self.packer
        return {
            "worker": self.worker,
            "slot": self.slot,
            "slots": self.slots,
            "epoch": self.epoch,
            "fresh": self.fresh,
            "pool": [[e, u] for e, u in sorted(self.pool.items()) if e >= self.epoch],
            "unit": self.u,
            "q": self.q,
            "i": self.i,
            "j": self.j,
            "seen": self.seen,
            "skipped": self.skipped,
            "batches": self.batches,
            "buffer": [x for smp in self.buf for x in (smp.shard, smp.member)],  # flat (shard, member) pairs
            "in_hand": None if self.in_hand is None else [self.in_hand.shard, self.in_hand.member],
            "shuffle_rng": None if self.shuffle_rng is None else encode_rng(self.shuffle_rng),
            "pack_rng": None if self.pack_rng is None else encode_rng(self.pack_rng),
            "packer": {
                "rows": [[self._doc_state(d) for d in row] for row in pk.rows],
                "current": [self._doc_state(d) for d in pk.current],
                "used": pk.used,
            },
            "text": None if self.text is None else self.text.state(),
        }

    def _doc_state(self, d: Document) -> dict:
        if d.pixels is not None:  # a VLM-picture document: its tokens as they are, the picture re-read on resume
            return {"t": d.tokens, "v": 1, "ref": list(d.source), "e": d.epoch, "k": d.key}
        if d.edit_source is not None:  # an editing triple: tokens with both images' placeholders, latents re-read
            return {"t": d.tokens, "x": 1, "l": d.lm_loss, "ref": list(d.source), "e": d.epoch, "k": d.key}
        if d.latent is None:
            return {"t": d.tokens}
        s = d.image_start  # the image's -1 placeholders are not stored
        toks = d.tokens[:s] + d.tokens[s + self.T :]
        st = {"t": toks, "s": s, "a": d.caption_after, "ref": list(d.source), "e": d.epoch, "k": d.key}
        if not d.lm_loss:
            st["l"] = False
        return st

    def _restore(self, st: dict) -> None:
        if (st["slot"], st["slots"]) != (self.slot, self.slots):
            raise ValueError(f"loader state of slot {st['slot']}/{st['slots']} given to slot {self.slot}/{self.slots}")
        self.epoch, self.fresh, self.pool = st["epoch"], st["fresh"], {e: u for e, u in st["pool"]}
        self.u, self.q, self.i, self.j = st["unit"], st["q"], st["i"], st["j"]
        self.seen, self.skipped, self.batches = st["seen"], st["skipped"], st["batches"]
        self.shuffle_rng = decode_rng(st["shuffle_rng"]) if st["shuffle_rng"] else None
        self.pack_rng = decode_rng(st["pack_rng"]) if st["pack_rng"] else None
        self.units = [] if self.fresh else self._units_of(self.epoch)
        self.text = None
        if self.ratio > 0 and not self.fresh:
            self.text = TextReader(self.text_urls, self.cfg.seed, self.epoch, self.slot, self.slots, st["text"])
        flat, pk = st["buffer"], st["packer"]
        refs = [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]
        docs = [d for row in [*pk["rows"], pk["current"]] for d in row]
        wanted = refs + [tuple(d["ref"]) for d in docs if d.get("ref") is not None]
        if st["in_hand"] is not None:
            wanted.append(tuple(st["in_hand"]))
        got = self._read_refs(wanted)
        self.buf = [got[r] for r in refs]
        self.in_hand = None if st["in_hand"] is None else got[tuple(st["in_hand"])]
        self.packer = Packer(self.cfg.data.seq_length, self.sp, used=pk["used"])
        self.packer.rows = [[self._doc(d, got) for d in row] for row in pk["rows"]]
        self.packer.current = [self._doc(d, got) for d in pk["current"]]

    def _read_refs(self, refs: list[tuple[int, int]]) -> dict[tuple[int, int], Sample]:
        """Decode the referenced samples, one pass per shard that holds some."""
        by_shard: dict[int, set[int]] = defaultdict(set)
        for g, i in refs:
            by_shard[g].add(i)
        before, got = self.decodes, {}
        for g in sorted(by_shard):
            members, last = by_shard[g], max(by_shard[g])
            for idx, (key, parts) in enumerate(iter_tar_groups(self.shards[g])):
                if idx in members:
                    self.decodes += 1
                    latent, caption, _ = read_latent_sample(parts)
                    got[(g, idx)] = Sample(
                        g, idx, f"{self.shards[g]}#{key}", latent, caption, self._pixels(parts), read_edit_source(parts)
                    )
                if idx >= last:
                    break
        missing = set(refs) - set(got)
        if missing:
            raise ValueError(
                f"loader state names samples the data does not hold (shard, member): {sorted(missing)[:5]}"
            )
        self.restore_decodes += self.decodes - before
        return got

    def _doc(self, d: dict, got: dict[tuple[int, int], Sample]) -> Document:
        if d.get("ref") is None:
            return Document(list(d["t"]))
        sample = got[tuple(d["ref"])]
        if sample.key != d["k"]:
            raise ValueError(f"loader state expects {d['k']!r} at {d['ref']}, the data holds {sample.key!r}")
        if d.get("v"):
            if self.vlm is None or sample.pixels is None:
                raise ValueError(
                    f"loader state holds a LLaVA picture document ({d['k']}): resume with "
                    "data.vlm_understanding=true on the data it was saved with"
                )
            pixels = self.vlm.normalise(sample.pixels, sample.key)
            return Document(list(d["t"]), key=d["k"], source=(sample.shard, sample.member), epoch=d["e"], pixels=pixels)
        if d.get("x"):
            if sample.source is None:
                raise ValueError(f"loader state expects an editing triple at {d['k']!r}, the data holds a pair")
            toks = list(d["t"])
            return Document(
                toks,
                sample.latent,
                toks.index(-1),
                d["k"],
                False,
                (sample.shard, sample.member),
                d["e"],
                edit_source=sample.source,
                lm_loss=d["l"],
            )
        s, toks = d["s"], d["t"]
        tokens = toks[:s] + [-1] * self.T + toks[s:]
        doc = Document(tokens, sample.latent, s, d["k"], d["a"], (sample.shard, sample.member), d["e"])
        doc.lm_loss = d.get("l", True)
        return doc

    def _units_of(self, epoch: int) -> list[dict]:
        return units_for(self.pool, epoch, self.cfg.seed, self.slot, self.slots, len(self.shards))

    def _begin_epoch(self) -> None:
        e, seed = self.epoch, self.cfg.seed
        self.units = self._units_of(e)
        self.u, self.q, self.i = 0, 0, 0
        self.j = self.units[0]["j"] if self.units else 0
        self.seen, self.buf, self.in_hand = 0, [], None
        self.shuffle_rng, self.pack_rng = shuffle_rng(seed, e, self.slot), pack_rng(seed, e, self.slot)
        self.text = None
        if self.ratio > 0:
            self.text = TextReader(self.text_urls, seed, e, self.slot, self.slots)
        self.fresh = False

    # -------------------------------------------------------------- samples
    def _source(self) -> Iterator[Sample]:
        while self.u < len(self.units):
            unit = self.units[self.u]
            while self.q < len(unit["shards"]):
                yield from self._read_shard(unit)
                self.q, self.i = self.q + 1, 0
            self.u, self.q, self.i = self.u + 1, 0, 0
            if self.u < len(self.units):
                self.j = self.units[self.u]["j"]

    def _read_shard(self, unit: dict) -> Iterator[Sample]:
        g = unit["shards"][self.q]
        frm, extra = (unit["from"], set(unit["extra"])) if self.q == 0 else (0, set())
        last = max(extra, default=-1) if frm is None else None  # named members only: stop after the last
        try:
            for idx, (key, parts) in enumerate(iter_tar_groups(self.shards[g])):
                if idx < self.i:  # passed, not decoded
                    continue
                if last is not None and idx > last:
                    break
                self.i = idx + 1
                if frm is None or idx < frm:
                    if idx not in extra:
                        continue
                else:
                    take = not unit["mod"] or self.j % unit["mod"] == unit["res"]
                    self.j += 1
                    if not take:
                        continue
                self.decodes += 1
                try:
                    latent, caption, _ = read_latent_sample(parts)
                    pixels = self._pixels(parts)
                    source = read_edit_source(parts)
                except (BadSample, ValueError, UnicodeDecodeError):  # a bad stored picture is a ValueError
                    self.skipped += 1
                    continue
                yield Sample(g, idx, f"{self.shards[g]}#{key}", latent, caption, pixels, source)
        except BadSample:
            self.skipped += 1

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of a caption or text; a LLaVA's ``<image>`` id is dropped from them (a literal "<image>" in
        web text would otherwise claim a picture's features)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if self.vlm is not None:
            ids = [i for i in ids if i != self.vlm.image_token_id]
        return ids

    def _pixels(self, parts: dict[str, bytes]) -> np.ndarray | None:
        """The sample's stored picture when the run reads pictures (never decoded otherwise)."""
        return read_pixels(parts) if self.vlm is not None else None

    def _shuffled(self) -> Iterator[Sample]:
        size = max(1, self.cfg.data.shuffle_buffer)
        for sample in self._source():
            self.buf.append(sample)
            if len(self.buf) >= size:
                yield self.buf.pop(self.shuffle_rng.randrange(len(self.buf)))
        while self.buf:
            yield self.buf.pop(self.shuffle_rng.randrange(len(self.buf)))

    # -------------------------------------------------------------- packed micro-batches
    def run(self) -> Iterator[FusionBatch]:
        cfg = self.cfg
        while self.max_epochs is None or self.epoch < self.max_epochs:
            if self.fresh:
                self._begin_epoch()
            if self.in_hand is not None:  # restored inside its text-only documents: carry on with them
                yield from self._pack(self.in_hand)
            for sample in self._shuffled():
                if tuple(sample.latent.shape) != self.want or (
                    sample.source is not None and tuple(sample.source.shape) != self.want
                ):
                    raise ValueError(
                        f"{sample.key}: latent of shape {tuple(sample.latent.shape)}, the model expects {self.want} "
                        "(model.image.latent_channels/image_size/vae_downsample vs the cached --resolution and VAE)"
                    )
                self.seen += 1
                yield from self._pack(sample)
            if self.seen == 0 and self.epoch not in self.pool:
                raise ValueError(
                    f"data.path={cfg.data.path!r}: loader slot {self.slot} of {self.slots} (DP rank {self.dp_rank}) "
                    f"read no sample in epoch {self.epoch}; the data has fewer usable samples than DP ranks x "
                    "data.num_workers"
                )
            self.epoch, self.fresh = self.epoch + 1, True
        if self.max_epochs is not None:  # flush the tail of the last epoch
            pk = self.packer
            if pk.current:
                pk.rows.append(pk.current)
                pk.current, pk.used = [], 0
            while pk.rows:
                yield self._emit(min(cfg.data.micro_batch_size, len(pk.rows)))

    def _pack(self, sample: Sample) -> Iterator[FusionBatch]:
        cfg, sp, T, s, mb = self.cfg, self.sp, self.T, self.cfg.data.seq_length, self.cfg.data.micro_batch_size
        rng = self.pack_rng
        self.in_hand = sample
        while self.text is not None and rng.random() < self.ratio:  # text-only docs: a share `ratio` of all
            ids = self._text_ids(self.text.next())
            self.packer.add(make_document(ids, None, T, sp, True, s))
            while self.packer.ready() >= mb:
                yield self._emit(mb)
        self.in_hand = None
        ids = self._text_ids(sample.caption)
        if rng.random() < cfg.diffusion.caption_dropout:
            ids = []  # unconditional image for classifier-free guidance
        if sample.source is not None:  # an editing triple: the source is dropped for image guidance at a rate
            keep = rng.random() >= cfg.diffusion.edit_source_dropout
            doc = make_edit_document(
                ids, sample.source if keep else None, sample.latent, T, sp, s, cfg.data.edit_instruction_loss
            )
            doc.key, doc.source, doc.epoch = sample.key, (sample.shard, sample.member), self.epoch
            self.packer.add(doc)
            while self.packer.ready() >= mb:
                yield self._emit(mb)
            return
        caption_first = rng.random() < cfg.data.caption_first_prob
        if self.vlm is not None and not caption_first and ids and sample.pixels is not None:
            pixels = self.vlm.normalise(sample.pixels, sample.key)
            doc = make_vlm_document(ids, pixels, self.vlm.placeholders, sp, s)
        else:
            doc = make_document(ids, sample.latent, T, sp, caption_first, s)
        doc.key, doc.source, doc.epoch = sample.key, (sample.shard, sample.member), self.epoch
        self.packer.add(doc)
        while self.packer.ready() >= mb:
            yield self._emit(mb)

    def _emit(self, n: int) -> FusionBatch:
        rows = [self.packer.pop_row() for _ in range(n)]
        batch = rows_to_batch(rows, self.cfg.data.seq_length, self.sp, sequence_shards(self.cfg))
        batch.sample_keys = [d.key for row in rows for d in row if d.latent is not None]
        batch.sample_epochs = [d.epoch for row in rows for d in row if d.latent is not None]
        self.batches += 1
        batch.loader_state = self.state()
        return batch


class LatentSequenceDataset(IterableDataset):
    """A DP rank's micro-batches; ``resume[w]`` (a worker state or None: replay) per logical worker w."""

    def __init__(
        self,
        cfg: Config,
        dp_rank: int,
        dp_size: int,
        start_batch: int = 0,
        max_epochs: int | None = None,
        resume: list[dict | None] | None = None,
    ):
        super().__init__()
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.start_batch, self.max_epochs, self.resume = start_batch, max_epochs, resume
        self.shards = expand_inputs(cfg.data.path)

    def reader(self, worker: int, workers: int, state: dict | None = None) -> SlotReader:
        slot, slots = self.dp_rank * workers + worker, self.dp_size * workers
        return SlotReader(
            self.cfg, self.shards, slot, slots, worker, self.dp_rank, state=state, max_epochs=self.max_epochs
        )

    def __iter__(self) -> Iterator[FusionBatch]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader hands out workers' outputs round-robin starting at process 0; process i plays
        # logical worker (i + start) % W so the first batch out is global batch `start_batch`.
        wid = (wid + self.start_batch) % workers
        if self.resume is not None and len(self.resume) != workers:
            raise ValueError(f"{len(self.resume)} worker states for {workers} loader workers")
        state = self.resume[wid] if self.resume is not None else None
        reader = self.reader(wid, workers, state)
        skip = 0 if state is not None else len(range(wid, self.start_batch, workers))  # replay: drop consumed
        restore = reader.restore_decodes
        for n, batch in enumerate(reader.run()):
            if n < skip:
                restore = reader.decodes
                continue
            batch.loader_decodes = (restore, reader.decodes)  # (spent restoring, all so far): for tests, logs
            yield batch


def make_loader(
    cfg: Config,
    dp_rank: int,
    dp_size: int,
    start_batch: int = 0,
    max_epochs: int | None = None,
    resume: list[dict | None] | None = None,
) -> DataLoader:
    """``start_batch``: batches this rank consumed (rotates the workers; replayed by workers without a state)."""
    ds = LatentSequenceDataset(cfg, dp_rank, dp_size, start_batch, max_epochs, resume)
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        multiprocessing_context="spawn" if cfg.data.num_workers > 0 else None,
    )


def replay_state(cfg: Config, dp_rank: int, dp_size: int, worker: int, workers: int, batches: int) -> dict:
    """The state a worker reaches after ``batches`` batches from the start, by replaying them (slow path:
    only for a worker whose state was not recorded, when the layout changes)."""
    ds = LatentSequenceDataset(cfg, dp_rank, dp_size)
    reader = ds.reader(worker, workers)
    if batches <= 0:
        return reader.state()
    for n, batch in enumerate(reader.run()):
        if n == batches - 1:
            return batch.loader_state
    raise ValueError(f"worker {worker} of DP rank {dp_rank} produces fewer than {batches} batches")
