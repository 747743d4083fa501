"""Start a real single-node SLURM cluster (Debian slurm-wlm + munge) for the tests.

``start()`` writes ``/etc/slurm/slurm.conf`` for this host (root as SlurmUser, linuxproc
process tracking, no task plugin, cons_tres), starts ``munged`` as user munge, then
``slurmctld`` and ``slurmd``, and waits until the node is idle. It raises ``Unavailable``
with the reason when the packages are missing or the daemons cannot run here (then the
tests skip and say why; ``.ci/run`` installs the packages so CI runs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by megafusion tests/slurm_cluster.py"


class Unavailable(RuntimeError):
    pass


_STARTED: list[int] = []
"""Pids of the daemons start() started (munged, slurmctld, slurmd), for stop(); ones it reused are not here."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def _conf(host: str, cpus: int) -> str:
    return f"""{MARK}
ClusterName=megafusion
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


MUNGE_PID = Path("/run/munge/munged.pid")


def start_munge() -> int | None:
    """Start ``munged`` as user munge unless one runs; return the pid of the one started here (None: reused).

    Every SLURM daemon of every test cluster, in any network namespace, authenticates through this one
    munged: its socket lives on the filesystem (/run/munge), which the namespace nodes share.
    """
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        r = _run(["/usr/sbin/mungekey", "--create"])
        if r.returncode:
            raise Unavailable(f"mungekey --create failed: {r.stderr.strip()}")
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    if not _run(["pgrep", "-x", "munged"]).returncode:
        return None
    r = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
    if r.returncode:
        raise Unavailable(f"munged did not start: {r.stderr.strip()}")
    deadline = time.time() + 10
    while not MUNGE_PID.is_file() and time.time() < deadline:
        time.sleep(0.1)
    return int(MUNGE_PID.read_text().split()[0]) if MUNGE_PID.is_file() else None


def stop_pid(pid: int | None, timeout: float = 15.0) -> None:
    """SIGTERM ``pid``, SIGKILL it after ``timeout`` s; a pid already gone is fine."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def node_state() -> str:
    r = _run(["sinfo", "-h", "-o", "%T"])
    return r.stdout.strip() if r.returncode == 0 else ""


def start() -> dict:
    """Start (or reuse) the local cluster; returns {"host", "cpus"}."""
    for exe in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo"):
        if shutil.which(exe) is None and not Path("/usr/sbin", exe).exists():
            raise Unavailable(f"{exe} not found: install Debian's slurm-wlm and munge (.ci/run does)")
    if os.geteuid() != 0:
        raise Unavailable("the local SLURM cluster needs root (it writes /etc/slurm/slurm.conf and runs slurmd)")
    host, cpus = socket.gethostname().split(".")[0], os.cpu_count() or 1
    if node_state() in ("idle", "mixed", "allocated"):
        return {"host": host, "cpus": cpus}
    if CONF.exists() and MARK not in CONF.read_text():
        raise Unavailable(f"{CONF} exists and was not written by these tests; not touching a real cluster")
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(_conf(host, cpus))
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
        Path(d).mkdir(parents=True, exist_ok=True)
    munged = start_munge()
    if munged is not None:
        _STARTED.append(munged)
    for daemon in ("slurmctld", "slurmd"):
        if _run(["pgrep", "-x", daemon]).returncode:
            started = time.time()
            r = _run([f"/usr/sbin/{daemon}"])
            if r.returncode:
                raise Unavailable(f"{daemon} did not start: {r.stderr.strip()} (see /var/log/slurm/{daemon}.log)")
            pid = _daemon_pid(Path(f"/run/{daemon}.pid"), since=started)
            if pid is not None:
                _STARTED.append(pid)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = node_state()
        if state in ("idle", "mixed"):
            return {"host": host, "cpus": cpus}
        if state.startswith("down") or state.startswith("drain"):
            _run(["scontrol", "update", f"NodeName={host}", "State=RESUME"])
        time.sleep(1)
    raise Unavailable(f"the SLURM node never became idle (state {node_state()!r}; /var/log/slurm/*.log)")


def _daemon_pid(pidfile: Path, since: float, timeout: float = 10.0) -> int | None:
    """The pid a daemon wrote to ``pidfile`` after ``since``: its parent returns before the file is written."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pidfile.stat().st_mtime >= since - 1:
                return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.1)
    return None


def stop() -> None:
    """Stop, by pid and newest first, the daemons start() started; a cluster it found running stays up."""
    while _STARTED:
        stop_pid(_STARTED.pop())


def job_state(job_id: str) -> str:
    r = _run(["scontrol", "show", "job", job_id])
    for tok in r.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return ""


def wait_job(job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id)
        if state in states:
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {job_state(job_id)!r} after {timeout:.0f}s")
