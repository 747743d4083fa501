"""The training loop a cluster run uses.

One optimizer step = megatron-core's ``forward_backward_func`` over the
step's micro-batches (no pipelining, 1F1B, or interleaved, chosen by
megatron-core from the layout) -> TP sequence-parallel grad sync -> a
non-finite check -> DeepSpeed ``allreduce_gradients()`` + ``step()`` (ZeRO over
the data-parallel group, clipping at ``optim.clip_grad``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megafusion.checkpoint.files import frozen_source_fingerprint, latest_checkpoint, verify_file
from megafusion.checkpoint.training_state import load_checkpoint
from megafusion.config.schema import Config
from megafusion.data.stream import LoaderStream, SyntheticStream, TrainItem
from megafusion.parallel.grads import (
    allreduce_sequence_parallel_grads,
    average_replicated_grads,
    broadcast_replicated_weights,
    ensure_accumulated_grad,
)
from megafusion.parallel.process_groups import ParallelContext
from megafusion.training.checkpointing import CheckpointSaver
from megafusion.training.engine import build_engine, optimizer_state_bytes
from megafusion.training.flops import attention_pairs, image_io_flops_per_image, transformer_flops_per_step
from megafusion.training.lr_schedule import learning_rate
from megafusion.training.metrics import ScalarLogger, StepStats, peak_flops, peak_memory_gb
from megafusion.training.preemption import StopSignal
from megafusion.training.stages import broadcast_replica_weights, build_stage_models, sync_replica_grads


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Trainer:
    def __init__(self, cfg: Config, hf_dir: str, log: Callable[[str], None] = print, stop: StopSignal | None = None):
        self.cfg, self.hf_dir = cfg, hf_dir
        self.rank0 = dist.get_rank() == 0
        self._log = log
        self.pctx = ParallelContext.current(cfg.parallel.sequence_parallel, cfg.parallel.params_dtype)
        self.models = build_stage_models(cfg, hf_dir, self.pctx)  # one chunk per virtual stage
        self.engine, self.optimizer = build_engine(self.models, cfg)
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        d = cfg.data
        self.num_micro = d.global_batch_size // (d.micro_batch_size * self.dp_size)
        device = next(self.models[0].parameters()).device
        self.device = device  # small collectives (flags, losses) live here: NCCL only takes CUDA tensors
        if cfg.data.path:
            self.stream = LoaderStream(cfg, self.dp_rank, self.dp_size, device, self.num_micro)
        else:  # no data configured: synthetic packed batches of the same form
            self.stream = SyntheticStream(cfg, self.dp_rank, device, self.num_micro)
        self.step = 0
        self.skipped = 0
        self.nonfinite_run = 0
        run_dir = Path(cfg.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else run_dir / "checkpoints"
        self.tb = ScalarLogger(str(run_dir / "tb") if (self.rank0 and cfg.logging.tensorboard) else None)
        self.stop = stop if stop is not None else StopSignal()
        self.saver = CheckpointSaver(self.save_dir, cfg, self.log, async_save=cfg.checkpoint.async_save)
        self._peak = peak_flops(cfg)
        self._img_flops = image_io_flops_per_image(cfg)
        self.history: list[StepStats] = []

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self.rank0:
            self._log(msg)

    def _stop_requested(self) -> bool:
        """Did any rank receive a stop signal? (collective: every rank stops at the same step)"""
        flag = torch.tensor([1.0 if self.stop.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.models for p in m.parameters() if p.requires_grad]

    def describe(self) -> None:
        n_train = sum(p.numel() for p in self.trainable_parameters())
        n_frozen = sum(p.numel() for m in self.models for p in m.parameters() if not p.requires_grad)
        self.log(
            f"[train] layout TP={self.pctx.tp_size} PP={ps.get_pipeline_model_parallel_world_size()} "
            f"DP={self.dp_size} SP={self.pctx.sequence_parallel} ZeRO={self.cfg.parallel.zero_stage} "
            f"micro-batches/step={self.num_micro}; rank 0 holds {n_train / 1e6:.2f}M trainable and "
            f"{n_frozen / 1e6:.2f}M frozen params, "
            f"optimizer state {optimizer_state_bytes(self.optimizer) / 2**20:.1f} MiB"
        )

    # ------------------------------------------------------------------ checkpoints
    def save(self, wait: bool = False) -> None:
        """Start a checkpoint of this step (the previous one is waited for); ``wait`` until it is published."""
        self.saver.save(
            self.step,
            self.engine.module,
            self.optimizer,
            {
                "data_position": {
                    "step": self.step,
                    "micro_batches_per_step": self.num_micro,
                    "dp": self.dp_size,
                    "consumed_micro_batches_per_dp_rank": self.step * self.num_micro,
                    "path": self.cfg.data.path,
                    "num_workers": self.cfg.data.num_workers,
                },
                "skipped_steps": self.skipped,
                "frozen_source": frozen_source_fingerprint(self.hf_dir),
            },
            extra_files=self._loader_state_file(),
        )
        if wait:
            self.saver.wait()

    def _loader_state_file(self) -> dict[str, bytes]:
        """``data/dp{r}.json``: this DP rank's loader position, written by its TP 0 / PP 0 rank (the others hold
        the same one). Taken here, in the loop, because the stream moves on while the writer runs."""
        if not isinstance(self.stream, LoaderStream):
            return {}
        if ps.get_tensor_model_parallel_rank() != 0 or ps.get_pipeline_model_parallel_rank() != 0:
            return {}
        return {f"data/dp{self.dp_rank}.json": json.dumps(self.stream.state_dict()).encode()}

    def _restore_loader(self, path: Path, index: dict) -> bool:
        """Continue the data stream from the saved loader states (every DP rank's, for a layout change).

        False when the checkpoint holds none (older checkpoints, converted ones): the stream then
        replays up to the step, as before.
        """
        rels = sorted(k for k in index if k.startswith("data/dp") and k.endswith(".json"))
        if not rels or not isinstance(self.stream, LoaderStream):
            return False
        for rel in rels:
            verify_file(path, rel, index)
        states = [json.loads((path / rel).read_text()) for rel in rels]
        msg = self.stream.load_state_dict(states, self.step)
        if msg:
            self.log(f"[train] warning: {msg}")
        self.log(f"[train] data loader continues from its saved position ({len(states)} DP rank states)")
        return True

    def maybe_resume(self) -> bool:
        path = latest_checkpoint(self.save_dir)
        finetune = False
        if path is None and self.cfg.checkpoint.load:
            path = latest_checkpoint(self.cfg.checkpoint.load) or Path(self.cfg.checkpoint.load)
            finetune = self.cfg.checkpoint.load_weights_only
        if path is None:
            return False
        meta = load_checkpoint(path, self.engine.module, self.optimizer, weights_only=finetune)
        saved_src, now_src = meta.get("frozen_source"), frozen_source_fingerprint(self.hf_dir)
        if isinstance(saved_src, dict) and saved_src.get("files") != now_src["files"]:
            raise ValueError(
                f"{path}: its frozen text tower came from {saved_src.get('path')} with files {saved_src.get('files')}, "
                f"but checkpoint.hf_llama={self.hf_dir} has {now_src['files']}; resume with the same base Llama"
            )
        if finetune:  # step 0, fresh optimizer and data stream: only the weights come from the trained run
            self.log(f"[train] fine-tuning from the weights of {path} (step {meta.get('step', 0)} there; here step 0)")
            return True
        pos = meta.get("data_position", {})
        saved_dp = int(pos.get("dp", meta.get("resharded_from", meta["layout"]).get("dp", self.dp_size)))
        saved_micro = pos.get("micro_batches_per_step", self.num_micro) * saved_dp
        if saved_micro != self.num_micro * self.dp_size:
            raise ValueError(
                f"{path}: saved with {saved_micro} micro-batches per step (DP={saved_dp}), this run has "
                f"{self.num_micro * self.dp_size} (DP={self.dp_size}); data.global_batch_size and "
                "data.micro_batch_size must stay equal"
            )
        self.step = int(meta["step"])
        self.skipped = int(meta.get("skipped_steps", 0))
        index = json.loads((path / "index.json").read_text())
        restored = self.cfg.data.path and self._restore_loader(path, index)
        if self.cfg.data.path and not restored:
            if pos.get("num_workers", self.cfg.data.num_workers) != self.cfg.data.num_workers:
                raise ValueError(
                    f"{path}: saved with data.num_workers={pos['num_workers']} and no loader state, this run has "
                    f"data.num_workers={self.cfg.data.num_workers}; the batch order depends on it, keep it equal"
                )
            if saved_dp != self.dp_size:
                self.log(
                    f"[train] warning: DP changed {saved_dp} -> {self.dp_size} and the checkpoint has no loader "
                    "state; the latent shards are dealt to DP ranks anew, so from here the sample order differs "
                    "from an unresharded run (counts are kept)"
                )
        self.log(f"[train] resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        item: TrainItem = next(data_iterator)
        # the last stage's forward already returns (loss, logged parts), which is what megatron wants back
        return model(item.batch, item.noise), lambda output: output

    def train_step(self) -> StepStats:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = learning_rate(cfg.optim, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        items = [self.stream.item(self.step, m) for m in range(self.num_micro)]
        fb = get_forward_backward_func()
        reduced = fb(
            forward_step_func=self._forward_step,
            data_iterator=[iter(items) for _ in self.models] if len(self.models) > 1 else iter(items),
            model=self.models,
            num_microbatches=self.num_micro,
            seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.data.micro_batch_size,
            forward_only=False,
        )
        for m in self.models:
            allreduce_sequence_parallel_grads(m, self.pctx.tp_group)
            average_replicated_grads(m, self.pctx.tp_group)  # replicas stay equal whatever the kernels
        sync_replica_grads(self.models)
        stats = self._reduce_losses(reduced)
        if not math.isfinite(stats[0]):
            self._poison_grads()  # a non-finite loss must skip the step even if its grads look finite
        self._fill_missing_grads()
        # DeepSpeed finds non-finite gradients through the global grad norm (reduced over DP and
        # TP x PP), skips the update and clears its own buffers; we only count.
        self.engine.allreduce_gradients()
        self.engine.step()
        skipped = bool(getattr(self.optimizer, "overflow", False))
        if not skipped:
            broadcast_replica_weights(self.models)
            if cfg.parallel.zero_stage == 2:  # its hooks reduced the grads before average_replicated_grads ran
                for m in self.models:
                    broadcast_replicated_weights(m, self.pctx.tp_group)
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
            self.nonfinite_run = 0
        else:
            self.skipped += 1
            self.nonfinite_run += 1
            grad_norm = float("nan")
            self.log(
                f"[train] step {self.step + 1}: non-finite loss or gradient, step skipped "
                f"({self.nonfinite_run} in a row, {self.skipped} in total)"
            )
            if self.nonfinite_run >= cfg.optim.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient "
                    f"(optim.max_consecutive_nonfinite={cfg.optim.max_consecutive_nonfinite}); stopping. "
                    f"The last good checkpoint in {self.save_dir} is intact."
                )
        self.step += 1
        dt = time.perf_counter() - t0
        return self._stats(stats, grad_norm, lr, dt, items)

    def _fill_missing_grads(self) -> None:
        """Zeros for every trainable parameter this step gave no gradient (a text-only micro-batch never
        reaches the U-Nets): DeepSpeed reduces only parameters with a gradient, so without this one DP
        rank would issue other collectives than its peers (a crash under gloo, a hang under NCCL).
        This covers ZeRO-1, which reduces here; ZeRO-2 reduces in backward hooks, which fire for every
        parameter because its model runs the image side on empty slices (``Routes.with_full_graph``).
        Under bf16 the zeros are DeepSpeed's fp32 accumulation buffer (``parallel.grads``)."""
        for p in self.trainable_parameters():
            ensure_accumulated_grad(p)

    def _poison_grads(self) -> None:
        for p in self.trainable_parameters():
            ensure_accumulated_grad(p).fill_(float("nan"))

    def _reduce_losses(self, reduced: list) -> list[float]:
        """Mean of (loss, lm_loss, diffusion_loss) over micro-batches and DP ranks, known on every rank."""
        vals = torch.zeros(3, dtype=torch.float64, device=self.device)
        if reduced:
            for r in reduced:
                vals += torch.stack([r["loss"], r["lm_loss"], r["diffusion_loss"]]).double().to(self.device)
            vals /= len(reduced)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # only the last stage has losses: sum over the pipeline group moves them to every stage
            dist.all_reduce(vals, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(vals, group=ps.get_data_parallel_group())
        vals /= self.dp_size
        return vals.cpu().tolist()

    def _stats(self, losses: list[float], grad_norm: float, lr: float, dt: float, items) -> StepStats:
        cfg = self.cfg
        text = sum(int((it.batch.image_ids < 0).sum()) for it in items)
        image = sum(int((it.batch.image_ids >= 0).sum()) for it in items)
        n_img = sum(it.batch.num_images for it in items)
        seqs = sum(it.batch.input_ids.shape[0] for it in items)
        pairs = sum(attention_pairs(it.batch.document_ids, it.batch.image_ids) for it in items)
        flops = (transformer_flops_per_step(cfg, text, image, seqs, pairs) + n_img * self._img_flops) * self.dp_size
        world = dist.get_world_size()
        tokens = (text + image) * self.dp_size
        return StepStats(
            step=self.step,
            loss=losses[0],
            lm_loss=losses[1],
            diffusion_loss=losses[2],
            grad_norm=grad_norm,
            lr=lr,
            tokens_per_s=tokens / dt,
            samples_per_s=seqs * self.dp_size / dt,
            mfu=flops / dt / (self._peak * world),
            mem_gb=peak_memory_gb(),
            skipped=self.skipped,
        )

    # ------------------------------------------------------------------ the loop
    def run(self, total_steps: int | None = None) -> list[StepStats]:
        cfg = self.cfg
        total = total_steps if total_steps is not None else cfg.optim.train_steps
        interval = max(1, cfg.checkpoint.interval)
        t_start, start_step = time.time(), self.step
        if self.step < total and self._stop_requested():  # a preemption arrived while the run was starting
            self.log(
                f"[train] stop signal received during start-up (at step {self.step}): exiting without a save; "
                f"{latest_checkpoint(self.save_dir) or 'no checkpoint'} stays latest"
            )
            self.tb.close()
            return self.history
        try:
            while self.step < total:
                stats = self.train_step()
                self.history.append(stats)
                done = self.step - start_step
                eta = (time.time() - t_start) / done * (total - self.step)
                if self.rank0:
                    with open(Path(cfg.logging.run_dir) / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(dataclasses.asdict(stats)) + "\n")
                    if self.step % cfg.logging.log_interval == 0 or self.step == total:
                        self._log(stats.line(total, eta))
                        self.tb.log(stats)
                if self._stop_requested():
                    self.log(f"[train] stop signal received: saving at step {self.step} and exiting")
                    self.save(wait=True)  # after the save in flight, if any
                    break
                if self.step % interval == 0 or self.step == total:
                    self.save()
        finally:
            self.saver.wait()  # the run ends when its last checkpoint is published (also on an error)
        self.tb.close()
        return self.history
