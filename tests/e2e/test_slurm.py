"""cluster/train_70b.slurm on a real single-node SLURM cluster: it trains, and a preempted job requeues and resumes.

The cluster (Debian slurm-wlm + munge) is started by tests/slurm_cluster.py. The job
script is the one a 32-node run uses, unedited: sbatch options shrink the allocation
(1 node, 2 tasks, no GPUs) and environment variables pick the tiny preset.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests import slurm_cluster

ROOT = Path(__file__).resolve().parents[2]
CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gres=none", "--cpus-per-task=1"]
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def cluster():
    try:
        info = slurm_cluster.start()
    except slurm_cluster.Unavailable as exc:
        slurm_cluster.stop()
        pytest.skip(f"no local SLURM cluster: {exc}")
    try:
        yield info
    finally:
        slurm_cluster.stop()  # the daemons it started; nothing outlives the module


def _env(tmp_path: Path, steps: int, interval: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(
        MEGAFUSION_CONFIG="tiny",
        RUN_DIR=str(tmp_path / "run"),
        SBATCH_OUTPUT=str(tmp_path / "job-%j.out"),
        MEGAFUSION_OVERRIDES=f"parallel.tensor_parallel=2 optim.train_steps={steps} "
        f"checkpoint.interval={interval} logging.tensorboard=false",
        OMP_NUM_THREADS="1",
    )
    return env


def _log(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob("job-*.out")))


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sbatch_trains_and_writes_a_checkpoint(cluster, tmp_path):
    r = subprocess.run(
        ["sbatch", "--wait", *CPU_NODE, "cluster/train_70b.slurm"],
        cwd=ROOT,
        env=_env(tmp_path, 4, 2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = _log(tmp_path)
    assert r.returncode == 0, r.stderr + log[-3000:]
    run = tmp_path / "run"
    assert "[slurm] 2 tasks on 1 node(s)" in log and "layout TP=2 PP=1 DP=1" in log
    assert _steps(run) == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run / "config.yaml").is_file() and len((run / "git_revision.txt").read_text().strip()) in (40, 7)


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes(cluster, tmp_path):
    total = 300
    r = subprocess.run(
        ["sbatch", "--parsable", *CPU_NODE, "cluster/train_70b.slurm"],
        cwd=ROOT,
        env=_env(tmp_path, total, 1000),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    run = tmp_path / "run"
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and len(_steps(run)) >= 5):
        assert time.time() < deadline, _log(tmp_path)[-3000:]
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path)[-3000:]
        time.sleep(0.5)
    # what --signal=B:USR1@600 delivers before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=60)
    deadline = time.time() + 120
    while "Restarts=1" not in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout:
        assert time.time() < deadline, _log(tmp_path)[-3000:]
        time.sleep(0.5)
    # SLURM holds a requeued job back for cred_expire (10 s in the test cluster's slurm.conf) before it starts
    # again; releasing it sooner (StartTime=now) races the node's revocation of the old credential
    # ("Job credential revoked": the job fails without running).
    state = slurm_cluster.wait_job(job, timeout=600)
    log = _log(tmp_path)
    assert state == "COMPLETED", log[-3000:]
    assert "[slurm] USR1: asking the trainer to checkpoint" in log
    first_stop = [ln for ln in log.splitlines() if "stop signal received: saving at step" in ln]
    assert len(first_stop) == 1, log[-3000:]
    at = int(first_stop[0].split("saving at step")[1].split()[0])
    assert f"resumed from {run / 'checkpoints' / f'step_{at:08d}'} at step {at}" in log
    steps = _steps(run)
    assert steps == list(range(1, total + 1)), (at, steps[:20])  # no step lost or repeated
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{total:08d}"
    jobs = (run / "slurm_jobs.log").read_text()
    assert f"job {job} restart 0" in jobs and f"job {job} restart 1" in jobs


@pytest.mark.slow
def test_signal_during_start_up_requeues_and_keeps_latest(cluster, tmp_path):
    """USR1 while the ranks build the model (before step 1): exit 0 without a save, requeue, resume from latest."""
    run = tmp_path / "run"
    first = subprocess.run(
        ["sbatch", "--wait", *CPU_NODE, "cluster/train_70b.slurm"],
        cwd=ROOT,
        env=_env(tmp_path, 2, 2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr + _log(tmp_path)[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    r = subprocess.run(
        ["sbatch", "--parsable", *CPU_NODE, "cluster/train_70b.slurm"],
        cwd=ROOT,
        env=_env(tmp_path, 4, 2),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out = tmp_path / f"job-{job}.out"
    # once every rank has joined the process group its handler is installed; the model is built next
    deadline = time.time() + 300
    while not (out.is_file() and "ranks joined; building the model" in out.read_text()):
        assert time.time() < deadline, _log(tmp_path)[-3000:]
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path)[-3000:]
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=60)
    state = slurm_cluster.wait_job(job, timeout=600)
    log = out.read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "[slurm] USR1: asking the trainer to checkpoint" in log
    start_up = [ln for ln in log.splitlines() if "stop signal received during start-up" in ln]
    assert len(start_up) == 1 and "step_00000002 stays latest" in start_up[0], log[-3000:]
    assert "saving at step" not in log  # nothing was saved by the interrupted start
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in log
    assert _steps(run) == [1, 2, 3, 4]  # steps 1-2 from the first job, 3-4 after the requeue
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert f"job {job} restart 1" in (run / "slurm_jobs.log").read_text()
