"""Kill, preempt and resume the real launcher; half-written checkpoints are never `latest`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megafusion.checkpoint.files import CheckpointError, latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def _clean_env() -> dict:
    """The test process's environment without rendezvous variables (a child picks its own)."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


ARGS = [
    "--config",
    "tiny",
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "data.global_batch_size=2",
    "optim.warmup_steps=1000",
    "optim.lr=0.1",
    "logging.tensorboard=false",
    "checkpoint.interval=1",
]
# warmup longer than any run here: the LR of a step does not depend on optim.train_steps


def _cmd(run_dir: Path, steps: int, base: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launcher.train",
        *ARGS,
        f"optim.train_steps={steps}",
        f"logging.run_dir={run_dir}",
        f"checkpoint.hf_llama={base}",
    ]


def _env(**extra: str):
    return dict(_clean_env(), **extra)


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run re-logs redone steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _run_until(cmd, pattern: str, sig: int, timeout: float = 300, env: dict | None = None):
    """Start cmd, send `sig` once `pattern` appears in its stdout, return (returncode, stdout)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines, deadline, sent = [], time.time() + timeout, False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and pattern in line:
                os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
                sent = True
            if time.time() > deadline:
                raise AssertionError("timed out:\n" + "".join(lines[-30:]))
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert sent, "pattern never appeared:\n" + "".join(lines[-30:])
    return proc.returncode, "".join(lines)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    return write_random_hf_llama(load_config("tiny").model, tmp_path_factory.mktemp("base") / "llama", seed=5)


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    r = subprocess.run(_cmd(run, 6, base), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return _losses(run)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(base, uninterrupted, tmp_path):
    run = tmp_path / "killed"
    code, out = _run_until(_cmd(run, 6, base), "step      3/6", signal.SIGKILL)
    assert code != 0
    ckpt = latest_checkpoint(run / "checkpoints")
    # saves are asynchronous: when step 3 is logged, step 2's may still be in flight, step 1's is published
    assert ckpt is not None and json.loads((ckpt / "meta.json").read_text())["step"] >= 1
    r = subprocess.run(_cmd(run, 6, base), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_sigkill_during_async_write_keeps_latest_and_resumes(base, uninterrupted, tmp_path):
    """The step-3 writer stalls after its first file (fault injection); training goes on meanwhile
    (step 4 runs), the process is killed then: `latest` stays on step 2 and the resumed run equals
    the uninterrupted one."""
    run = tmp_path / "killed_mid_write"
    env = _env(MEGAFUSION_FAULT_SAVE_STALL="3:120", MEGAFUSION_PREEMPT_LEAD_S="0.001")
    code, out = _run_until(_cmd(run, 6, base), "step      4/6", signal.SIGKILL, env=env)
    assert code != 0
    assert "step 3:" not in out  # the step-3 checkpoint never completed...
    assert "step 2: " in out and "complete" in out  # ...while step 2's did, and was logged
    assert "MEGAFUSION_PREEMPT_LEAD_S=0.001 s is less than twice the last save" in out  # the budget warning
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000002"
    half = run / "checkpoints" / "step_00000003.tmp"
    assert half.is_dir() and not (half / "meta.json").exists()
    r = subprocess.run(_cmd(run, 6, base), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert not half.exists()  # the dead save's folder is cleaned up by the next save
    resumed = _losses(run)
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(base, uninterrupted, tmp_path):
    run = tmp_path / "preempted"
    code, out = _run_until(_cmd(run, 50, base), "step      2/50", signal.SIGTERM)
    assert code == 0, out[-2000:]
    assert "stop signal received" in out
    ckpt = latest_checkpoint(run / "checkpoints")
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert 2 <= step < 50
    # loadable: a restarted run continues from it with the uninterrupted run's losses
    r = subprocess.run(_cmd(run, step + 2, base), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"at step {step}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    losses = _losses(run)
    for s in range(1, min(step + 2, 6) + 1):
        assert losses[s] == pytest.approx(uninterrupted[s], rel=1e-6, abs=1e-7), s


def test_half_written_checkpoint_is_never_latest(tmp_path):
    save = tmp_path / "ckpts"
    good = save / "step_00000004"
    good.mkdir(parents=True)
    (good / "meta.json").write_text("{}")
    (save / "latest").write_text("step_00000004\n")
    partial = save / "step_00000005.tmp"  # a save that died before its rename
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "tp0_pp0.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(save) == good
    (save / "latest").write_text("step_00000005.tmp\n")  # even a pointer to it is refused
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        latest_checkpoint(save)
    assert latest_checkpoint(tmp_path / "nothing") is None
