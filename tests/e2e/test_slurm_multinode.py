"""cluster/train_70b.slurm on a real two-node SLURM cluster of network-namespace nodes (tests/netns_cluster.py).

node1 and node2 are namespaces with their own addresses (198.18.0.11/.12), hostnames, hosts files and PID
namespaces; slurmctld runs in the root namespace, one slurmd per node. The job script is the unedited 32-node
one: sbatch options shrink the allocation to 2 nodes x 2 tasks and the variables cluster/train_common.sh
documents (MEGAFUSION_CONFIG, MEGAFUSION_OVERRIDES, RUN_DIR) pick the tiny preset at TP=2 x PP=2, so each
pipeline stage is one node's TP pair and every activation crosses the "network". Checked: where each rank ran,
the losses against the same layout under torchrun on one host, preemption (USR1 -> every rank saves -> requeue
-> resume, every step exactly once) and a node lost mid-run (the job ends within the collective timeout
instead of hanging; the resubmitted job resumes from the last checkpoint). The group takes ~4 minutes here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns_cluster import NetnsNodes, SlurmNetnsCluster
from tests.slurm_cluster import Unavailable

ROOT = Path(__file__).resolve().parents[2]
BASE = Path("/tmp/megafusion-netns-slurm")  # fixed, so that a run after an interrupted one finds its leftovers
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--gres=none", "--cpus-per-task=1"]
LAYOUT = "parallel.tensor_parallel=2 parallel.pipeline_parallel=2 logging.tensorboard=false"
_RANK_LINE = re.compile(r"\[launcher\] rank (\d+)/(\d+) local (\d+) on (\S+) \((\S+)\)")
# nothing of the test's own environment may decide where ranks meet: only what the job script documents
_NOT_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def cluster():
    nodes = NetnsNodes(2, tag="slurm")
    slurm = SlurmNetnsCluster(nodes, BASE, cpus=2, slurmd_timeout=20)  # a site's is often 300
    try:
        nodes.start()
        slurm.start()
    except Unavailable as exc:
        slurm.stop()
        nodes.stop()
        pytest.skip(f"no two-node SLURM cluster of namespaces: {exc} (bash cluster/install_local_slurm.sh, as root)")
    try:
        yield slurm
    finally:
        slurm.stop()
        nodes.stop()


def _env(cluster: SlurmNetnsCluster, tmp_path: Path, steps: int, interval: int, extra: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED and not k.startswith("SLURM_")}
    env.update(
        MEGAFUSION_CONFIG="tiny",
        RUN_DIR=str(tmp_path / "run"),
        SBATCH_OUTPUT=str(tmp_path / "job-%j.out"),
        MEGAFUSION_OVERRIDES=f"{LAYOUT} optim.train_steps={steps} checkpoint.interval={interval} {extra}".strip(),
    )
    return cluster.env(env)


def _log(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob("job-*.out")))


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _sbatch(cluster, tmp_path, env, *opts: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sbatch", *opts, *TWO_NODES, "cluster/train_70b.slurm"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_steps(cluster, tmp_path: Path, job: str, n: int, timeout: float = 240) -> None:
    run = tmp_path / "run"
    deadline = time.time() + timeout
    while len(_metrics(run)) < n:
        assert time.time() < deadline, _log(tmp_path)[-3000:]
        state = cluster.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, _log(tmp_path)[-3000:])
        time.sleep(0.5)


def _ranks(log: str) -> dict[int, tuple[str, str]]:
    """rank -> (node, address) from every rank's '[launcher] rank R/W local L on HOST (ADDR)' line."""
    return {int(m[1]): (m[4], m[5]) for m in _RANK_LINE.finditer(log)}


def _on_both_nodes(log: str) -> None:
    assert _ranks(log) == {
        0: ("node1", "198.18.0.11"),
        1: ("node1", "198.18.0.11"),
        2: ("node2", "198.18.0.12"),
        3: ("node2", "198.18.0.12"),
    }, log[-3000:]


@pytest.mark.slow
def test_two_nodes_train_with_the_pipeline_split_across_them(cluster, tmp_path):
    """Ranks 0-1 (stage 0) on node1, 2-3 (stage 1) on node2; losses as under torchrun on one host."""
    steps = 4
    r = _sbatch(cluster, tmp_path, _env(cluster, tmp_path, steps, 2), "--wait", timeout=300)
    log = _log(tmp_path)
    assert r.returncode == 0, r.stderr + log[-3000:]
    assert "[slurm] 4 tasks on 2 node(s), rendezvous node1:" in log, log[-3000:]
    assert "(gloo interface eth0)" in log  # found by train_common.sh: the node's 198.18.0.11 interface
    assert "layout TP=2 PP=2 DP=1" in log
    _on_both_nodes(log)
    got = _metrics(tmp_path / "run")
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"

    # the same layout on one host, under torchrun (no SLURM): the same numbers
    ref_dir = tmp_path / "ref"
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED and not k.startswith("SLURM_")}
    ref = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "launcher.train"]
        + ["--config", "tiny", *LAYOUT.split(), f"optim.train_steps={steps}", "checkpoint.interval=2"]
        + [f"logging.run_dir={ref_dir}"],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _metrics(ref_dir)
    for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm", "lr"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-6, abs=1e-7), key


@pytest.mark.slow
def test_preemption_saves_on_both_nodes_requeues_and_resumes(cluster, tmp_path):
    total = 30
    run = tmp_path / "run"
    r = _sbatch(cluster, tmp_path, _env(cluster, tmp_path, total, 1000), "--parsable")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    _wait_steps(cluster, tmp_path, job, 4)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=60, env=cluster.env())
    deadline = time.time() + 120
    while "Restarts=1" not in cluster.show_job(job):
        assert time.time() < deadline, _log(tmp_path)[-3000:]
        time.sleep(0.5)
    # the requeued job waits out cred_expire (10 s) before it starts again (see tests/e2e/test_slurm.py)
    deadline = time.time() + 240
    while (state := cluster.job_state(job)) not in ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"):
        assert time.time() < deadline, (state, _log(tmp_path)[-3000:])
        time.sleep(1)
    log = _log(tmp_path)
    assert state == "COMPLETED", log[-3000:]
    assert "[slurm] USR1: asking the trainer to checkpoint" in log
    stops = [ln for ln in log.splitlines() if "stop signal received: saving at step" in ln]
    assert len(stops) == 1, log[-3000:]
    at = int(stops[0].split("saving at step")[1].split()[0])
    assert f"resumed from {run / 'checkpoints' / f'step_{at:08d}'} at step {at}" in log
    # every rank wrote its part of the preemption checkpoint: stage 0 from node1, stage 1 from node2
    ckpt = run / "checkpoints" / f"step_{at:08d}"
    assert {p.name for p in (ckpt / "model").iterdir()} == {f"tp{t}_pp{p}.safetensors" for t in (0, 1) for p in (0, 1)}
    assert {p.name for p in (ckpt / "rng").iterdir()} == {f"rank{r}.safetensors" for r in range(4)}
    assert [m["step"] for m in _metrics(run)] == list(range(1, total + 1)), at  # no step lost or repeated
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{total:08d}"
    jobs = (run / "slurm_jobs.log").read_text()
    assert f"job {job} restart 0 on node[1-2]" in jobs and f"job {job} restart 1 on node[1-2]" in jobs
    # both runs of the job had ranks on both nodes
    assert len(_RANK_LINE.findall(log)) == 8
    _on_both_nodes(log)


@pytest.mark.slow
def test_lost_node_ends_the_job_within_bounded_time_and_the_requeued_job_resumes(cluster, tmp_path):
    """node2 lost mid-run: node1's ranks fail after parallel.collective_timeout_s instead of hanging for 30 min,
    slurmctld declares node2 DOWN after SlurmdTimeout and ends the job (NODE_FAIL; --requeue requeues it);
    when node2 is back the job resumes from the last checkpoint, losing at most checkpoint.interval steps."""
    total, interval, timeout_s = 20, 4, 15
    run = tmp_path / "run"
    env = _env(cluster, tmp_path, total, interval, f"parallel.collective_timeout_s={timeout_s}")
    r = _sbatch(cluster, tmp_path, env, "--parsable")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    _wait_steps(cluster, tmp_path, job, interval + 2)
    lost = cluster.lose_node(2)  # node2's cable cut, its slurmd and ranks SIGKILLed by pid
    t_lost = time.time()
    assert lost
    # the ranks' collective timeout, then slurmctld's SlurmdTimeout (+ a ping period and KillWait)
    bound = timeout_s + cluster.slurmd_timeout + 30
    while (state := cluster.job_state(job)) in ("RUNNING", "CONFIGURING"):
        assert time.time() - t_lost < bound, f"job {job} still {state} {time.time() - t_lost:.0f}s after node2 was lost"
        time.sleep(0.5)
    ended_after = time.time() - t_lost
    print(f"[test] job {job} left RUNNING {ended_after:.1f}s after node2 was lost: {state}")
    log = _log(tmp_path)
    # node1's ranks fail on the collective timeout (the first to time out may close the others' sockets first)
    assert log.count(f"Timed out waiting {timeout_s * 1000}ms") >= 1, log[-3000:]
    last = max(m["step"] for m in _metrics(run))
    latest = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert last - latest <= interval, (last, latest)
    # node2 comes back (a reboot); the requeued job runs again (or, had SLURM not requeued it, a resubmit)
    cluster.start_slurmd(2, wait=False)
    if "Restarts=1" not in cluster.show_job(job):
        deadline = time.time() + 120
        while cluster.job_state(job) == "COMPLETING":
            assert time.time() < deadline, cluster.show_job(job)
            time.sleep(0.5)
        r = _sbatch(cluster, tmp_path, env, "--parsable")
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while (state := cluster.job_state(job)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline, (state, _log(tmp_path)[-3000:])
        time.sleep(1)
    log = _log(tmp_path)
    assert state == "COMPLETED", log[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{latest:08d}'} at step {latest}" in log, log[-3000:]
    steps = [m["step"] for m in _metrics(run)]
    # steps after the last checkpoint ran twice (<= checkpoint.interval of them), every other step once
    assert steps == list(range(1, last + 1)) + list(range(latest + 1, total + 1)), (last, latest, steps)
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{total:08d}"
