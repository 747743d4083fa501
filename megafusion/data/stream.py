"""The trainer's view of data: an indexable stream of (micro-batch, noise) per data-parallel rank.

Position in the stream is (step, micro-batch index); the stream is a pure
function of that position, the seed and the DP rank, so a resumed run reads
exactly the batches an uninterrupted run would have read, and every pipeline
stage of one DP replica sees the same batch (first stage: inputs; last stage:
labels and noise targets). A resume restores the loader from its saved position
(:meth:`LoaderStream.state_dict` / :meth:`LoaderStream.load_state_dict`) without
decoding what was consumed; without a saved position it replays.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace

import torch

from megafusion.config.schema import Config
from megafusion.data.latent_cache import expand_inputs
from megafusion.data.loader_state import FORMAT, DataOrderWarning, redistribute, shards_crc
from megafusion.data.synthetic import synthetic_batch
from megafusion.diffusion.objective import noised, sample_timesteps, with_clean_sources
from megafusion.diffusion.schedule import CosineSchedule
from megafusion.model.batch import FusionBatch


def item_seed(cfg: Config, step: int, index: int) -> int:
    """Seed of the randomness of micro-batch ``index`` of ``step``, counted over the whole global batch.

    ``index = dp_rank * micro_batches_per_step + micro``: the global batch of a step is
    the same set of micro-batches at every DP size, so a run resumed at another DP
    size (a resharded checkpoint) sees the batches an unresharded run would have.
    """
    return ((cfg.seed * 1_000_003 + step) * 4099 + index) * 131


@dataclass
class TrainItem:
    batch: FusionBatch  # latents are noised: x_t
    noise: torch.Tensor  # [n_img, C, H, W] the diffusion target: epsilon, or v (diffusion.prediction)
    epochs: list[int] | None = None  # loader epoch each image was read in (provenance, beside batch.sample_keys)


def noised_item(
    clean: FusionBatch,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: CosineSchedule,
    cfg: Config,
    device: torch.device,
) -> TrainItem:
    """A clean micro-batch, its noise and timesteps -> what the stages consume (x_t in the batch, the target beside)."""
    noisy, target = noised(schedule, clean.latents, noise, t, cfg.diffusion.prediction)
    noisy, t = with_clean_sources(noisy, clean.latents, t, clean.clean_images)  # editing sources stay clean
    return TrainItem(replace(clean, latents=noisy, timesteps=t).to(device), target.to(device))


class SyntheticStream:
    """Synthetic packed batches of the training form, for runs without ``data.path`` (smoke runs, tests)."""

    def __init__(self, cfg: Config, dp_rank: int, device: torch.device, micro_per_step: int):
        self.cfg, self.dp_rank, self.device = cfg, dp_rank, device
        self.micro_per_step = micro_per_step
        self.schedule = CosineSchedule(cfg.diffusion.num_timesteps)
        self.caption_len = (4, 12)  # [min, max) caption tokens of a synthetic document

    def item(self, step: int, micro: int) -> TrainItem:
        seed = item_seed(self.cfg, step, self.dp_rank * self.micro_per_step + micro)
        clean = synthetic_batch(self.cfg, seed=seed, caption_len=self.caption_len)
        g = torch.Generator().manual_seed(seed + 17)
        noise = torch.randn(clean.latents.shape, generator=g)
        return noised_item(clean, noise, clean.timesteps, self.schedule, self.cfg, self.device)


LAYOUT_KEYS = ("seed", "shuffle_buffer", "seq_length", "text_path")
"""Settings the saved worker states depend on, beside DP size and worker count: another value redistributes."""


def _layout(cfg: Config) -> dict:
    d = cfg.data
    return {
        "seed": cfg.seed,
        "shuffle_buffer": d.shuffle_buffer,
        "seq_length": d.seq_length,
        "text_path": d.text_path,
        "micro_batch_size": d.micro_batch_size,
        "text_ratio": d.text_ratio,
        "caption_first_prob": d.caption_first_prob,
        "caption_dropout": cfg.diffusion.caption_dropout,
    }


class LoaderStream:
    """Packed micro-batches from latent shards (``data.path``), noised like :class:`SyntheticStream`.

    Position = micro-batches this DP rank has consumed; ``item(step, micro)`` reads
    position ``step * micro_batches_per_step + micro``. The stream keeps, per logical
    loader worker, the state carried by the last batch it handed out from that worker
    (workers prefetch: only handed-out batches count), so :meth:`state_dict` is the
    position after the last item. :meth:`load_state_dict` continues from saved states;
    jumping elsewhere without one (a checkpoint saved without loader state) restarts
    the loader at that position, replaying the consumed batches.
    """

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, device: torch.device, micro_per_step: int):
        self.cfg, self.dp_rank, self.dp_size, self.device = cfg, dp_rank, dp_size, device
        self.micro_per_step = micro_per_step
        self.schedule = CosineSchedule(cfg.diffusion.num_timesteps)
        self.workers = max(1, cfg.data.num_workers)  # logical workers (0 processes = 1 in-process worker)
        self.position = 0
        self.base = 0  # position at which the worker states started from their initial ones (0: the run's start)
        self._states: list[dict | None] = [None] * self.workers  # None: not recorded, reached by replay
        self._it = None
        self._shards: list[str] | None = None

    def item(self, step: int, micro: int) -> TrainItem:
        from megafusion.data.loader import make_loader

        want = step * self.micro_per_step + micro
        if want != self.position:  # a jump without a saved state: replay the layout's stream up to it
            self.position, self.base, self._states, self._it = want, 0, [None] * self.workers, None
        if self._it is None:
            resume = self._states if any(s is not None for s in self._states) else None
            start = self.position - self.base
            self._it = iter(make_loader(self.cfg, self.dp_rank, self.dp_size, start_batch=start, resume=resume))
        clean = next(self._it)
        self._states[clean.loader_state["worker"]] = clean.loader_state
        self.position += 1
        epochs = getattr(clean, "sample_epochs", None)
        g = torch.Generator().manual_seed(item_seed(self.cfg, step, self.dp_rank * self.micro_per_step + micro))
        n = clean.num_images
        if n == 0:
            return TrainItem(clean.to(self.device), torch.zeros(0), epochs)
        t = sample_timesteps(self.cfg.diffusion, n, g, clean.caption_after)
        noise = torch.randn(clean.latents.shape, generator=g)
        item = noised_item(clean, noise, t, self.schedule, self.cfg, self.device)
        item.epochs = epochs
        return item

    # -------------------------------------------------------------- saved position
    def _shard_list(self) -> list[str]:
        if self._shards is None:
            self._shards = expand_inputs(self.cfg.data.path)
        return self._shards

    def state_dict(self) -> dict:
        """This DP rank's loader position after the last item handed out: plain JSON types, a few KB per
        worker (references to buffered samples, not their latents). Save one per DP rank."""
        shards = self._shard_list()
        return {
            "format": FORMAT,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.cfg.data.num_workers,
            "logical_workers": self.workers,
            "data_path": self.cfg.data.path,
            "shards": len(shards),
            "shards_crc": shards_crc(shards),
            "layout": _layout(self.cfg),
            "micro_per_step": self.micro_per_step,
            "consumed": self.position,
            "base": self.base,
            "workers": list(self._states),
        }

    def load_state_dict(self, states: list[dict], step: int) -> str | None:
        """Continue from the saved states of the DP ranks of the saved run (pass all: every one is
        needed when the layout changed; this rank's alone suffices when it did not), at ``step``.

        Same DP size, worker count and layout settings: exactly the uninterrupted stream.
        Otherwise the samples the saved run had not consumed in its unfinished epochs are
        dealt over the new slots (each exactly once) and later epochs follow the new
        layout: warns (:class:`DataOrderWarning`) and returns that message; else None.
        """
        states = self._check(states)
        here = states[0]
        position = step * self.micro_per_step
        changed = [f"DP size {here['dp_size']} -> {self.dp_size}"] if here["dp_size"] != self.dp_size else []
        if here["logical_workers"] != self.workers:
            changed.append(f"loader workers {here['logical_workers']} -> {self.workers}")
        now = _layout(self.cfg)
        changed += [f"{k} {here['layout'][k]!r} -> {now[k]!r}" for k in LAYOUT_KEYS if here["layout"][k] != now[k]]
        if not changed:
            st = next((s for s in states if s["dp_rank"] == self.dp_rank), None)
            if st is None:
                raise ValueError(f"no loader state of DP rank {self.dp_rank} among the saved ones")
            rel = st["consumed"] - st["base"]
            if st["micro_per_step"] == self.micro_per_step and st["consumed"] != position:
                raise ValueError(
                    f"loader state of DP rank {self.dp_rank} is at micro-batch {st['consumed']}, step {step} "
                    f"resumes at {position}: the state was saved at another step than the checkpoint"
                )
            for w, ws in enumerate(st["workers"]):
                if ws is not None and ws["batches"] != len(range(w, rel, self.workers)):
                    raise ValueError(f"loader state of DP rank {self.dp_rank}: worker {w} is not at batch {rel}")
            self.position, self.base, self._states, self._it = position, position - rel, list(st["workers"]), None
            return None
        if [s["dp_rank"] for s in states] != list(range(here["dp_size"])):
            raise ValueError(
                f"loader states of DP ranks {[s['dp_rank'] for s in states]}: another layout needs all "
                f"{here['dp_size']} of the saved run"
            )
        old = self._old_worker_states(states)
        slots = self.dp_size * self.workers
        new = redistribute(old, self.cfg.seed, here["shards"], slots, here["layout"]["seed"])
        mine = new[self.dp_rank * self.workers : (self.dp_rank + 1) * self.workers]
        for w, ws in enumerate(mine):
            ws["worker"] = w
        self.position, self.base, self._states, self._it = position, position, mine, None
        epochs = [e for e, _ in new[0]["pool"]]
        span = f"epochs {epochs[0]}..{epochs[-1]}" if epochs else "no epoch"
        msg = (
            f"data loader layout changed ({', '.join(changed)}): the batch order differs from the saved run's. "
            f"What the saved run had not consumed of {span} (shuffle buffers and pending packer documents "
            f"included) is dealt over the {slots} new loader slots, each sample once; later epochs follow the "
            "new layout's order. Pending text-only documents are dropped, the text stream restarts."
        )
        warnings.warn(msg, DataOrderWarning, stacklevel=2)
        return msg

    def _check(self, states: list[dict]) -> list[dict]:
        if not states:
            raise ValueError("load_state_dict needs the loader states of every DP rank of the saved run")
        states = sorted(states, key=lambda s: s["dp_rank"])
        first = states[0]
        if any(s.get("format") != FORMAT for s in states):
            raise ValueError(f"loader state format {first.get('format')!r}, this loader reads {FORMAT}")
        runs = {(s["dp_size"], s["logical_workers"], tuple(sorted(s["layout"].items()))) for s in states}
        if len(runs) > 1:
            raise ValueError("loader states of different saved runs (DP size, workers or layout differ)")
        shards = self._shard_list()
        if (first["shards"], first["shards_crc"]) != (len(shards), shards_crc(shards)):
            raise ValueError(
                f"loader state was saved over {first['shards']} shards of data.path={first['data_path']!r}; "
                f"data.path={self.cfg.data.path!r} has {len(shards)} other shards: start its position afresh"
            )
        return states

    def _old_worker_states(self, states: list[dict]) -> list[dict]:
        """Every worker state of the saved run; one never recorded (a replayed start) is replayed here."""
        from megafusion.data.loader import replay_state

        old_cfg = copy.deepcopy(self.cfg)
        lay = states[0]["layout"]
        old_cfg.seed = lay["seed"]
        for k in ("shuffle_buffer", "seq_length", "text_path", "micro_batch_size", "text_ratio", "caption_first_prob"):
            setattr(old_cfg.data, k, lay[k])
        old_cfg.diffusion.caption_dropout = lay["caption_dropout"]
        out = []
        for st in states:
            w_old = st["logical_workers"]
            for w, ws in enumerate(st["workers"]):
                if ws is None:
                    n = len(range(w, st["consumed"] - st["base"], w_old))
                    ws = replay_state(old_cfg, st["dp_rank"], st["dp_size"], w, w_old, n)
                out.append(ws)
        return out
