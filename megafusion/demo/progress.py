"""How long the rest of the main job will take, read off a training stage while it runs.

The demo's time is almost all training, and a machine can be twice as fast or slow as
the one the README was measured on; after the first steps of a training stage the
step rate is known, so the demo can say when it will end instead of a fixed figure.
The trainer's rank 0 appends one JSON line per logged step to ``metrics.jsonl``;
:class:`TrainingWatch` polls that file from a thread of the demo process (no change
to the trainer, no extra process) and prints an estimate twice: once the rate has
settled after the first steps, and at the stage's halfway mark.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path


def last_step(metrics: Path) -> int:
    """The highest ``step`` in a metrics.jsonl (0 when absent or empty; a half-written last line is skipped)."""
    try:
        text = metrics.read_text()
    except OSError:
        return 0
    step = 0
    for line in text.splitlines():
        try:
            step = max(step, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return step


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class TrainingWatch(threading.Thread):
    """Prints this stage's and the whole demo's remaining time from the step rate of ``metrics``.

    ``later_s(step_s, startup_s)`` gives the seconds of every stage after this one, from this
    stage's measured seconds per step and its start-up (launch to first step): the demo's
    other training stage runs the same steps on the same machine, so it is predicted
    from them. Steps already in ``metrics`` when the watch starts (a resumed run) are
    not counted in the rate.
    """

    def __init__(
        self,
        name: str,
        metrics: Path,
        total_steps: int,
        later_s: Callable[[float, float], float],
        settle_steps: int | None = None,
        poll_s: float = 2.0,
        out: Callable[[str], None] = print,
    ):
        super().__init__(daemon=True, name=f"watch {name}")
        self.stage, self.metrics, self.total = name, metrics, total_steps
        self.later_s, self.poll_s, self.out = later_s, poll_s, out
        settle = settle_steps if settle_steps is not None else max(10, total_steps // 20)
        self.marks = sorted({m for m in (settle, total_steps // 2) if 0 < m < total_steps})  # steps to report at
        self.first: tuple[float, int] | None = None  # (wall time, step) when stepping was first seen
        self.initial = 0  # the last step already logged when the stage started (a resumed run)
        self.started = time.time()
        self.done = threading.Event()
        self.estimates: list[float] = []  # seconds left for the demo, at each report (tests read them)

    def stop(self) -> None:
        self.done.set()
        self.join()

    def run(self) -> None:
        self.started = time.time()
        self.initial = last_step(self.metrics)  # a resumed run's earlier lines: not this run's rate
        while not self.done.wait(self.poll_s) and self.marks:
            line = self.observe(time.time(), last_step(self.metrics))
            if line:
                self.out(line)

    def observe(self, now: float, step: int) -> str | None:
        """Take one reading (wall time, last logged step); the report line when a mark is passed."""
        if step <= self.initial:
            return None
        if self.first is None:  # the rate is measured from the first step seen, not from launch
            self.first = (now, step)
            return None
        t1, s1 = self.first
        if not self.marks or step <= s1 or step < self.marks[0]:
            return None
        self.marks = [m for m in self.marks if m > step]
        step_s = (now - t1) / (step - s1)
        startup_s = max(t1 - self.started - (s1 - self.initial) * step_s, 0.0)  # launch to this run's first step
        stage_left = (self.total - step) * step_s
        demo_left = stage_left + self.later_s(step_s, startup_s)
        self.estimates.append(demo_left)
        return (
            f"[demo] {self.stage}: step {step}/{self.total} at {step_s:.3f} s/step: this stage ends in about "
            f"{minutes(stage_left)}, the demo in about {minutes(demo_left)}"
        )
