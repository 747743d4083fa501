"""Which rank this process is, from torchrun's or SLURM's environment: the one parser every entry point uses.

``torchrun`` exports RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; ``srun`` starts each task with
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE instead. ``launcher.train``,
``tools/sample.py`` and the benchmarks must agree on the rank before any process group exists (rank 0
writes the run folder, ``--tp`` is checked against the world size), so they all read it here, and
:func:`export_rank_env` writes torchrun's names from SLURM's for ``init_process_group("env://")``.
Only the standard library is imported: the launcher's ``--check`` runs in the batch shell before srun.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the job; ``source`` says which launcher's variables gave it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str
    """'torchrun' (RANK/WORLD_SIZE), 'slurm' (SLURM_PROCID/SLURM_NTASKS) or 'single' (neither: one process)."""


def _slurm_local_world(env: Mapping[str, str]) -> int:
    """Tasks on this node: the first entry of SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE ('2' or '2(x3),1'),
    exact for the even layouts the scripts request (an approximation for uneven ones); 1 when SLURM says nothing."""
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    first = raw.split(",")[0].split("(")[0]
    return int(first) if first.isdigit() else 1


def rank_env(env: Mapping[str, str] | None = None) -> RankEnv:
    """The rank, world size and local rank of this process; torchrun's variables win over SLURM's.

    torchrun inside an srun task (one torchrun per node) sets RANK itself, so SLURM_PROCID (the node's
    task index then) must not be read as the rank whenever RANK or WORLD_SIZE is present.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        world = int(env.get("WORLD_SIZE", "1"))
        return RankEnv(
            int(env.get("RANK", "0")),
            world,
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", str(world))),
            "torchrun",
        )
    if "SLURM_NTASKS" in env:  # an srun task; or the batch shell (rank 0 there: `launcher.train --check`)
        world = int(env["SLURM_NTASKS"])
        return RankEnv(
            int(env.get("SLURM_PROCID", "0")),
            world,
            int(env.get("SLURM_LOCALID", "0")),
            _slurm_local_world(env),
            "slurm",
        )
    return RankEnv(0, 1, int(env.get("LOCAL_RANK", "0")), 1, "single")


def _first_slurm_host(env: Mapping[str, str]) -> str | None:
    """The allocation's first host, the rendezvous cluster/train_common.sh uses too."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist or shutil.which("scontrol") is None:
        return None
    r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    hosts = r.stdout.split()
    return hosts[0] if r.returncode == 0 and hosts else None


def export_rank_env(env: MutableMapping[str, str] | None = None) -> RankEnv:
    """Write RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (and, under SLURM, a missing MASTER_ADDR /
    MASTER_PORT) so that ``init_process_group(init_method="env://")`` finds them; return the rank env.

    The batch script exports MASTER_ADDR/PORT for its srun step; a bare ``srun python tools/sample.py``
    does not, so the same rule is applied here: the first host of the allocation, port 20000 + job id % 20000.
    """
    env = os.environ if env is None else env
    re = rank_env(env)
    if re.source == "slurm":
        env["RANK"], env["WORLD_SIZE"] = str(re.rank), str(re.world_size)
        env.setdefault("LOCAL_RANK", str(re.local_rank))
        env.setdefault("LOCAL_WORLD_SIZE", str(re.local_world_size))
        if "MASTER_ADDR" not in env and re.world_size > 1:
            host = _first_slurm_host(env)
            if host:
                env["MASTER_ADDR"] = host
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            env["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return re


def node_address(peer: str | None = None) -> tuple[str, str]:
    """(host name, the address this node reaches ``peer`` from): what a rank logs so that a multi-node run
    shows where each rank ran. The address comes from the route to the peer (a UDP connect sends nothing),
    which is the interface gloo/NCCL use, not whatever ``gethostbyname(hostname)`` says."""
    host = socket.gethostname()
    peer = peer or os.environ.get("MASTER_ADDR") or host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return host, s.getsockname()[0]
    except OSError:
        return host, "unknown"
