"""The demo's remaining-time estimate (megafusion/demo/progress.py), from a metrics.jsonl as the trainer writes it."""

from __future__ import annotations

import json
import time

import pytest

from megafusion.demo.progress import TrainingWatch, last_step


def _append(path, steps):
    with path.open("a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 1.0}) + "\n")


def test_last_step_reads_the_trainers_lines_and_skips_a_half_written_one(tmp_path):
    m = tmp_path / "metrics.jsonl"
    assert last_step(m) == 0  # not there yet: the trainer is starting
    _append(m, range(1, 8))
    with m.open("a") as f:
        f.write('{"step": 8, "lo')  # the trainer is mid-write
    assert last_step(m) == 7


def test_estimate_is_the_rate_times_the_steps_left_plus_the_later_stages():
    """1000 steps at 0.2 s/step after 10 s of start-up; later stages: 30 s + one more stage like this one."""
    later = lambda step_s, startup_s: 30.0 + startup_s + 1000 * step_s  # noqa: E731
    w = TrainingWatch("train llamafusion", None, 1000, later, out=lambda s: None)
    w.started = 0.0
    assert w.marks == [50, 500]
    assert w.observe(5.0, 0) is None  # still starting
    assert w.observe(10.2, 1) is None  # first step seen: the rate is measured from here
    assert w.observe(15.0, 25) is None  # before the first mark
    line = w.observe(10.2 + 0.2 * 59, 60)
    stage_left = 940 * 0.2
    demo_left = stage_left + 30.0 + 10.0 + 200.0
    assert w.estimates[-1] == pytest.approx(demo_left)
    assert "step 60/1000 at 0.200 s/step" in line and f"the demo in about {demo_left / 60:.1f} min" in line
    assert w.observe(10.2 + 0.2 * 100, 101) is None  # between the marks
    assert w.observe(10.2 + 0.25 * 599, 600) is not None  # the halfway report, at the slower rate now seen
    assert w.estimates[-1] == pytest.approx(
        400 * 0.25 + 30.0 + (10.2 - 0.25) + 1000 * 0.25
    )  # start-up: launch to step 0
    assert w.marks == [] and w.observe(10.2 + 0.25 * 700, 701) is None  # two reports in all


def test_a_resumed_runs_earlier_lines_do_not_count_towards_the_rate():
    seen = []
    w = TrainingWatch("train x", None, 100, lambda step_s, startup_s: seen.append(startup_s) or 0.0, settle_steps=10)
    w.out = lambda s: None
    w.started, w.initial = 0.0, 40  # the run resumes at step 40: its file already holds 40 lines
    assert w.observe(2.0, 40) is None  # start-up of the resumed run
    assert w.observe(30.0, 41) is None  # the first new step: the rate is measured from here
    assert "step 51/100 at 0.100 s/step" in w.observe(31.0, 51)
    assert seen == [pytest.approx(30.0 - 0.1)]  # start-up: launch to this run's first step (41), not to step 0


def test_watch_thread_reports_while_a_writer_trains(tmp_path):
    m = tmp_path / "metrics.jsonl"
    lines: list[str] = []
    w = TrainingWatch("train x", m, 40, lambda step_s, startup_s: 0.0, settle_steps=10, poll_s=0.01, out=lines.append)
    w.start()
    for s in range(1, 41):
        _append(m, [s])
        time.sleep(0.01)
    w.stop()
    assert lines and lines[0].startswith("[demo] train x: step ") and "this stage ends in about" in lines[0]
    assert len(lines) <= 2
