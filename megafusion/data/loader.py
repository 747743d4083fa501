"""Packed training micro-batches from latent shards, split over data-parallel ranks and loader workers.

Determinism is the contract: the micro-batches a DP rank sees are a pure
function of (data.path, seed, DP rank, DP size, data.num_workers, epoch), so
  * every TP and PP rank of one DP replica reads the same batches;
  * the union over ranks and workers of one epoch is the dataset, without overlap
    (shards are dealt round-robin to the rank x worker slots when there are
    enough of them, single samples otherwise);
  * a resumed run skips exactly the micro-batches already consumed
    (``start_batch``) and continues with the next one.
Logical worker w of a rank produces that rank's micro-batches w, w + W, w + 2W, ...;
``torch.utils.data.DataLoader`` returns its worker processes' outputs round-robin,
and process i plays logical worker (i + start_batch) % W, which restores the order.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megafusion.config.schema import Config
from megafusion.data.latent_cache import BadSample, expand_inputs, iter_tar_groups
from megafusion.data.packing import Packer, SpecialTokens, make_document, rows_to_batch
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


def read_latent_sample(parts: dict[str, bytes]) -> tuple[np.ndarray, str, dict]:
    """Explicit decoders: numpy without pickle, UTF-8, JSON."""
    if "npy" not in parts or "txt" not in parts:
        raise BadSample("missing_latent_or_caption")
    latent = np.load(io.BytesIO(parts["npy"]), allow_pickle=False)
    if not isinstance(latent, np.ndarray) or latent.ndim != 3:
        raise BadSample("bad_latent")
    meta = json.loads(parts["json"].decode("utf-8")) if "json" in parts else {}
    return latent, parts["txt"].decode("utf-8"), meta


class LatentSequenceDataset(IterableDataset):
    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, start_batch: int = 0, max_epochs: int | None = None):
        super().__init__()
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.start_batch, self.max_epochs = start_batch, max_epochs
        self.shards = expand_inputs(cfg.data.path)
        self.skipped = 0

    # -------------------------------------------------------------- samples of one slot
    def _slot_samples(self, slot: int, slots: int, epoch: int) -> Iterator[tuple[str, np.ndarray, str]]:
        order = list(self.shards)
        random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)  # same on every rank
        by_shard = len(order) >= slots
        mine = order[slot::slots] if by_shard else order
        j = 0
        for url in mine:
            try:
                for key, parts in iter_tar_groups(url):
                    take = by_shard or (j % slots == slot)
                    j += 1
                    if not take:
                        continue
                    try:
                        latent, caption, _ = read_latent_sample(parts)
                    except (BadSample, ValueError, UnicodeDecodeError):
                        self.skipped += 1
                        continue
                    yield f"{url}#{key}", latent, caption
            except BadSample:
                self.skipped += 1

    def _text_samples(self, slot: int, slots: int, epoch: int) -> Iterator[str]:
        """Text-only documents of this slot, cycled: dealt like the latent shards."""
        shards = expand_inputs(self.cfg.data.text_path)
        cycle = 0
        while True:
            order = list(shards)
            random.Random(self.cfg.seed * 104_729 + epoch * 1009 + cycle).shuffle(order)
            by_shard = len(order) >= slots
            j, produced = 0, 0
            for url in order[slot::slots] if by_shard else order:
                try:
                    for _key, parts in iter_tar_groups(url):
                        take = by_shard or (j % slots == slot)
                        j += 1
                        if take and "txt" in parts:
                            produced += 1
                            yield parts["txt"].decode("utf-8", errors="replace")
                except BadSample:
                    self.skipped += 1
            if produced == 0:
                raise ValueError(f"data.text_path={self.cfg.data.text_path!r} gives worker slot {slot} no text sample")
            cycle += 1

    def _shuffled(self, slot: int, slots: int, epoch: int):
        rng = random.Random((self.cfg.seed * 1_000_003 + epoch) * 65_537 + slot)
        buf: list = []
        size = max(1, self.cfg.data.shuffle_buffer)
        for sample in self._slot_samples(slot, slots, epoch):
            buf.append(sample)
            if len(buf) >= size:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    # -------------------------------------------------------------- packed micro-batches
    def batches(self, slot: int, slots: int) -> Iterator[FusionBatch]:
        cfg = self.cfg
        tok = load_tokenizer(cfg.data.tokenizer)
        sp = special_tokens(tok, cfg)
        T = cfg.model.image.tokens_per_image
        s, mb = cfg.data.seq_length, cfg.data.micro_batch_size
        epoch = 0
        packer = Packer(s, sp)  # kept across epochs: an epoch's tail opens the next one's rows
        while self.max_epochs is None or epoch < self.max_epochs:
            rng = random.Random((cfg.seed * 31 + epoch) * 65_537 + slot)
            seen = 0
            ratio = cfg.data.text_ratio if cfg.data.text_path else 0.0
            texts = self._text_samples(slot, slots, epoch) if ratio > 0 else None
            want = (cfg.model.image.latent_channels, cfg.model.image.latent_size, cfg.model.image.latent_size)
            for key, latent, caption in self._shuffled(slot, slots, epoch):
                if tuple(latent.shape) != want:
                    raise ValueError(
                        f"{key}: latent of shape {tuple(latent.shape)}, the model expects {want} "
                        "(model.image.latent_channels/image_size/vae_downsample vs the cached --resolution and VAE)"
                    )
                seen += 1
                while texts is not None and rng.random() < ratio:  # text-only docs: a share `ratio` of all
                    ids = tok(next(texts), add_special_tokens=False)["input_ids"]
                    packer.add(make_document(ids, None, T, sp, True, s))
                    while packer.ready() >= mb:
                        yield self._batch([packer.pop_row() for _ in range(mb)], sp)
                ids = tok(caption, add_special_tokens=False)["input_ids"]
                if rng.random() < cfg.diffusion.caption_dropout:
                    ids = []  # unconditional image for classifier-free guidance
                doc = make_document(ids, latent, T, sp, rng.random() < cfg.data.caption_first_prob, s)
                doc.key = key
                packer.add(doc)
                while packer.ready() >= mb:
                    rows = [packer.pop_row() for _ in range(mb)]
                    yield self._batch(rows, sp)
            if seen == 0:
                raise ValueError(
                    f"data.path={cfg.data.path!r}: loader slot {slot} of {slots} (DP rank {self.dp_rank}) read no "
                    f"sample in epoch {epoch}; the data has fewer usable samples than DP ranks x data.num_workers"
                )
            epoch += 1
            if self.max_epochs is not None and epoch >= self.max_epochs:  # flush the tail of the last epoch
                if packer.current:
                    packer.rows.append(packer.current)
                while packer.rows:
                    rows = [packer.pop_row() for _ in range(min(mb, len(packer.rows)))]
                    yield self._batch(rows, sp)

    def _batch(self, rows, sp) -> FusionBatch:
        batch = rows_to_batch(rows, self.cfg.data.seq_length, sp)
        batch.sample_keys = [d.key for row in rows for d in row if d.latent is not None]
        return batch

    def __iter__(self) -> Iterator[FusionBatch]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader hands out workers' outputs round-robin starting at process 0; process i plays
        # logical worker (i + start) % W so the first batch out is global batch `start_batch`.
        wid = (wid + self.start_batch) % workers
        slot, slots = self.dp_rank * workers + wid, self.dp_size * workers
        skip = len(range(wid, self.start_batch, workers))  # this worker's share of consumed batches
        for i, batch in enumerate(self.batches(slot, slots)):
            if i >= skip:
                yield batch


def make_loader(
    cfg: Config, dp_rank: int, dp_size: int, start_batch: int = 0, max_epochs: int | None = None
) -> DataLoader:
    ds = LatentSequenceDataset(cfg, dp_rank, dp_size, start_batch, max_epochs)
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        multiprocessing_context="spawn" if cfg.data.num_workers > 0 else None,
    )
