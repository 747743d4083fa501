"""Preemption signals, caught from the first moment of a run.

SLURM announces a preemption or the end of the time limit with SIGUSR1 (``--signal=B:USR1@600``,
forwarded by the job script to every rank) and kills with SIGTERM. Python's default action for
both is to die, which loses the requeue: the job script only requeues a trainer that exits 0.
``launcher.train`` therefore installs :class:`StopSignal` before anything slow (imports, the
rendezvous, building the model and DeepSpeed, reading the checkpoint), and the trainer asks it
before the first step and after every step: during start-up it exits 0 without saving (the
previous checkpoint stays ``latest``), during training it saves and exits 0.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Records the first SIGTERM / SIGUSR1 this process receives instead of dying of it."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> StopSignal:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def received(self) -> bool:
        return self.signum is not None
