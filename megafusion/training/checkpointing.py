"""Checkpoint saves that do not stop training: a host snapshot in the loop, the writing in a thread.

At 70B a save is ~1 TB over 256 ranks; written synchronously it stalls every rank for the
whole serialise + write + fsync, and a preemption save may not fit SLURM's signal window. Here
the loop blocks only for :func:`checkpoint.training_state.take_snapshot` (device-to-host copies
of the trainable weights and the ZeRO partition); a background thread writes, hashes as it
writes, fsyncs, and then joins the other ranks on a separate gloo group so that rank 0 publishes
the folder and moves ``latest`` only once every rank's files are complete.

Rules: at most one save in flight (the next save waits for it); the end of the run and the
preemption path wait for it too (the preemption path then saves the current step); a process
killed while a writer runs leaves the previous ``latest`` intact (the folder is still
``step_X.tmp``). The side group keeps the writer's collectives out of the training group's
order, which NCCL and gloo both require: two threads must never share a process group.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megafusion.checkpoint.training_state import Snapshot, remove_stale_saves, take_snapshot, write_snapshot
from megafusion.config.schema import Config

LEAD_ENV = "MEGAFUSION_PREEMPT_LEAD_S"
"""Seconds between SLURM's warning signal and its kill (the ``@N`` of ``--signal=B:USR1@N``)."""


class CheckpointSaver:
    """Saves of one run: snapshot in the caller, write in a thread (``async_save``) or inline."""

    def __init__(self, save_dir: str | Path, cfg: Config, log: Callable[[str], None], async_save: bool = True) -> None:
        self.save_dir, self.cfg, self.log = Path(save_dir), cfg, log
        self.async_save = async_save
        # collective: a side group for the writer threads (gloo handles CPU objects on every backend)
        self.group = dist.new_group(backend="gloo") if async_save else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: Path | None = None
        self.last: dict[str, float] = {}  # bytes, blocked_s, write_s, total_s of the last completed save
        lead = os.environ.get(LEAD_ENV)
        self.lead_s = float(lead) if lead else None

    # ------------------------------------------------------------------ API
    def save(self, step: int, model: torch.nn.Module, optimizer, extra: dict[str, Any], extra_files=None) -> None:
        """Collective: start checkpoint ``step`` (waits for the previous one first)."""
        self.wait()
        if dist.get_rank() == 0:
            remove_stale_saves(self.save_dir)  # none in flight now: any .tmp is a dead save's
        dist.barrier()
        snap = take_snapshot(step, model, optimizer, self.cfg, extra, extra_files)
        if not self.async_save:
            self._write(snap, time.perf_counter())
            self._raise()
            return
        self._thread = threading.Thread(
            target=self._write, args=(snap, time.perf_counter()), name=f"checkpoint-{step}", daemon=True
        )
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is published; re-raise its error on this rank."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()
        return self._result

    # ------------------------------------------------------------------ the writer
    def _write(self, snap: Snapshot, started: float) -> None:
        try:
            path, write_s = write_snapshot(snap, self.save_dir, self.cfg.checkpoint.keep, group=self.group)
        except BaseException as exc:  # surfaced by wait() on the training thread
            self._error = exc
            return
        total = time.perf_counter() - started + snap.seconds
        self._result = path
        self.last = {"bytes": snap.nbytes, "blocked_s": snap.seconds, "write_s": write_s, "total_s": total}
        self.log(
            f"[checkpoint] step {snap.step}: {path} complete; this rank wrote {snap.nbytes / 2**20:.1f} MiB in "
            f"{write_s:.2f} s ({snap.nbytes / max(write_s, 1e-9) / 2**30:.2f} GiB/s), the loop was blocked "
            f"{snap.seconds:.2f} s, save took {total:.2f} s"
        )
        if self.lead_s is not None and self.lead_s < 2 * total:
            self.log(
                f"[checkpoint] warning: the preemption lead time {LEAD_ENV}={self.lead_s:g} s is less than twice "
                f"the last save ({total:.1f} s): a save on preemption may not finish before the kill; raise the "
                "--signal=B:USR1@N lead (see tools/estimate_memory.py --write-gbps)"
            )

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
