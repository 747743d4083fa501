"""Test hosts on one machine: Linux network namespaces as cluster nodes, and a two-node SLURM cluster on them.

:class:`NetnsNodes` makes N "nodes": each a network namespace joined to a bridge in the root namespace, with
its own address from 198.18.0.0/15 (the range reserved for network test setups; nothing else is used), its
own hosts file (``/etc/netns/NAME/hosts``: every node's name and the root namespace's host) and, for every
command run on it, its own PID, UTS and mount namespaces: ``nsenter --net`` into the network namespace, then
``unshare --pid --fork --mount-proc --uts --mount``, the hosts file bind-mounted over /etc/hosts and the
hostname set. Not ``ip netns exec``: it remounts /sys, which hides /sys/fs/cgroup from slurmd; and without a
PID namespace a ``pkill``/``ray stop`` on one node reaches every node. The filesystem is shared, the way
cluster nodes share NFS. Everything started is tracked by pid and stopped by pid, the namespaces, links and
hosts files are removed on ``stop()`` (also after a failure: use it as a context manager), and leftovers of an
earlier interrupted run with the same ``tag`` are cleaned up before a new start.

:class:`SlurmNetnsCluster` runs slurmctld in the root namespace (``SlurmctldHost=<hostname>(198.18.S.1)``,
ports 16817/16818 so that it cannot meet tests/slurm_cluster.py's or a real cluster's daemons, its own
``slurm.conf`` selected by ``SLURM_CONF``) and one ``slurmd -N nodeI`` per node namespace, with per-node
spool, pid and log files (``%n``); munged is shared (tests/slurm_cluster.py ``start_munge``).

Both raise ``Unavailable`` (tests/slurm_cluster.py) with the reason when this machine cannot run them: not
root, no ``ip``/``nsenter``/``unshare``, no SLURM packages; the tests skip and say why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.slurm_cluster import Unavailable, start_munge, stop_pid

NETNS_DIR = Path("/var/run/netns")
HOSTS_DIR = Path("/etc/netns")


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _net_ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in_net_ns(ns_path: Path) -> list[int]:
    """Every process whose network namespace is ``ns_path``: all that runs on that node."""
    want = _net_ns_inode(str(ns_path))
    if want is None:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _net_ns_inode(f"{d}/ns/net") == want:
            out.append(int(d.name))
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def terminate_wrapped(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a :meth:`NetnsNodes.popen` process: SIGTERM to the node-side init (``unshare`` itself ignores
    SIGTERM while it waits for it), SIGKILL to the wrapper after ``timeout`` (``--kill-child`` then takes
    the init and its whole PID namespace down)."""
    if proc.poll() is not None:
        return
    _kill_all(_children(proc.pid), signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _kill_all(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class NetnsNodes:
    """``count`` namespace nodes ``node1..nodeN`` at 198.18.S.11, .12, ... behind bridge 198.18.S.1.

    ``tag`` names the namespaces (``mf-<tag>-node<i>``) and links so that two helpers (SLURM, Ray) can run
    at once; ``subnet`` S (0-255) picks their /24 inside 198.18.0.0/15. ``host_names`` are extra names for
    the root namespace's address in every node's hosts file (the real hostname is always one).
    """

    def __init__(self, count: int, tag: str = "slurm", subnet: int = 0, host_names: Sequence[str] = ()) -> None:
        if not 1 <= count <= 9:
            raise ValueError("1 to 9 nodes")
        if not 0 <= subnet <= 255 or len(tag) > 6:
            raise ValueError("subnet 0-255 (198.18.S.0/24) and a tag of at most 6 characters (link names)")
        self.count, self.tag, self.subnet = count, tag, subnet
        self.host = socket.gethostname().split(".")[0]
        self.host_names = [self.host, *host_names]
        self.bridge = f"mf{tag}br"
        self._procs: list[tuple[int, subprocess.Popen]] = []
        self._up = False

    # ------------------------------------------------------------------ names and addresses
    @property
    def host_addr(self) -> str:
        """The root namespace's address on the bridge (where slurmctld / a Ray head outside the nodes listens)."""
        return f"198.18.{self.subnet}.1"

    def name(self, i: int) -> str:
        """Node i's hostname (1-based)."""
        return f"node{i}"

    def addr(self, i: int) -> str:
        return f"198.18.{self.subnet}.{10 + i}"

    def netns(self, i: int) -> str:
        return f"mf-{self.tag}-node{i}"

    def _veth(self, i: int) -> str:
        return f"mf{self.tag}v{i}"

    def hosts_file(self, i: int) -> Path:
        return HOSTS_DIR / self.netns(i) / "hosts"

    def _hosts(self) -> str:
        lines = ["127.0.0.1 localhost", f"{self.host_addr} {' '.join(self.host_names)}"]
        lines += [f"{self.addr(i)} {self.name(i)}" for i in range(1, self.count + 1)]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def check_available() -> None:
        if os.geteuid() != 0:
            raise Unavailable("namespace test hosts need root (ip netns add, nsenter, unshare)")
        for exe in ("ip", "nsenter", "unshare", "mount"):
            if shutil.which(exe) is None:
                raise Unavailable(f"{exe} not found (util-linux / iproute2)")

    def start(self) -> NetnsNodes:
        self.check_available()
        self.cleanup_stale()
        self._up = True  # from here on stop() removes whatever was made
        try:
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
            for i in range(1, self.count + 1):
                ns, veth = self.netns(i), self._veth(i)
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
                _sh("ip", "link", "set", f"{veth}p", "netns", ns)
                _sh("ip", "link", "set", veth, "master", self.bridge, "up")
                _sh("ip", "-n", ns, "link", "set", f"{veth}p", "name", "eth0")
                _sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                self.hosts_file(i).parent.mkdir(parents=True, exist_ok=True)
                self.hosts_file(i).write_text(self._hosts())
        except Exception as exc:
            self.stop()
            raise Unavailable(f"could not build the namespace nodes: {exc}") from exc
        return self

    def cleanup_stale(self) -> None:
        """Remove what an interrupted earlier run with this tag left: processes in its namespaces, links, files."""
        for i in range(1, 10):
            ns = NETNS_DIR / self.netns(i)
            if ns.exists():
                _kill_all(_pids_in_net_ns(ns))
                _sh("ip", "netns", "delete", self.netns(i), check=False)
            _sh("ip", "link", "delete", self._veth(i), check=False)
            shutil.rmtree(HOSTS_DIR / self.netns(i), ignore_errors=True)
        _sh("ip", "link", "delete", self.bridge, check=False)

    def stop(self) -> None:
        """Stop everything started on the nodes (by pid), then remove namespaces, links and hosts files."""
        if not self._up:
            return
        for _, proc in self._procs:
            _kill_all(_children(proc.pid), signal.SIGTERM)
        for _, proc in self._procs:
            terminate_wrapped(proc, timeout=10)
        for i in range(1, self.count + 1):
            _kill_all(self.pids(i))  # anything that outlived its node's init (it should not)
        self._procs.clear()
        self.cleanup_stale()
        self._up = False

    def __enter__(self) -> NetnsNodes:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ running on a node
    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run on node i: its network namespace, fresh PID/UTS/mount namespaces, its hosts
        file and hostname. ``--kill-child``: when the wrapper is killed, the node's init and with it every
        process of that PID namespace die, so stopping the wrapper by pid stops all it started."""
        # the shell stays the node's init (PID 1 ignores signals it has no handler for): it forwards SIGTERM
        boot = (
            f"mount --bind {self.hosts_file(i)} /etc/hosts && hostname {self.name(i)} || exit 125; "
            "\"$@\" & c=$!; trap 'kill -TERM $c 2>/dev/null' TERM INT; wait $c; r=$?; "
            "if kill -0 $c 2>/dev/null; then wait $c; r=$?; fi; exit $r"
        )
        return [
            "nsenter",
            f"--net={NETNS_DIR / self.netns(i)}",
            "--",
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--uts",
            "--mount",
            "--",
            "sh",
            "-c",
            boot,
            "sh",
            *argv,
        ]

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` on node i in the background; ``stop()`` ends it."""
        proc = subprocess.Popen(self.command(i, argv), **kw)
        self._procs.append((i, proc))
        return proc

    def run(self, i: int, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` on node i and wait for it."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(i, argv), timeout=timeout, **kw)

    def pids(self, i: int) -> list[int]:
        """Every process running on node i (its network namespace), the wrappers included."""
        return _pids_in_net_ns(NETNS_DIR / self.netns(i))

    def link(self, i: int, up: bool) -> None:
        """Cut (or restore) node i's cable: with it down, packets to and from the node vanish without an answer,
        as with a node that lost power (a killed process's sockets would otherwise close cleanly)."""
        _sh("ip", "link", "set", self._veth(i), "up" if up else "down")

    def kill_node(self, i: int) -> list[int]:
        """Node i is lost: cut its link, then SIGKILL every process on it by pid; returns those pids."""
        self.link(i, up=False)
        pids = self.pids(i)
        _kill_all(pids)
        for _, proc in self._procs:
            if proc.pid in pids:
                proc.wait(timeout=10)
        self._procs = [(n, p) for n, p in self._procs if p.poll() is None]
        return pids


class SlurmNetnsCluster:
    """slurmctld in the root namespace and ``slurmd -N nodeI`` on every node of a :class:`NetnsNodes`.

    ``base`` holds slurm.conf, state, spool, pid and log files. ``env()`` gives the environment for
    sbatch / scontrol / squeue (``SLURM_CONF``); jobs inherit it, so ``scontrol`` in the batch script talks
    to this cluster. ``slurmd_timeout`` (s) is how long slurmctld waits before it declares a silent node DOWN.
    """

    CTLD_PORT, SLURMD_PORT = 16817, 16818

    def __init__(self, nodes: NetnsNodes, base: Path, cpus: int = 2, slurmd_timeout: int = 300) -> None:
        self.nodes, self.base, self.cpus, self.slurmd_timeout = nodes, Path(base), cpus, slurmd_timeout
        self.conf = self.base / "slurm.conf"
        self._ctld: subprocess.Popen | None = None
        self._slurmd: dict[int, subprocess.Popen] = {}
        self._munge_pid: int | None = None

    @property
    def nodelist(self) -> str:
        return f"node[1-{self.nodes.count}]" if self.nodes.count > 1 else "node1"

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _conf_text(self) -> str:
        n = self.nodes
        addrs = ",".join(n.addr(i) for i in range(1, n.count + 1))
        b = self.base
        return f"""# written by megafusion tests/netns_cluster.py
ClusterName=mfnetns{n.tag}
SlurmctldHost={n.host}({n.host_addr})
SlurmctldPort={self.CTLD_PORT}
SlurmdPort={self.SLURMD_PORT}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/slurmctld.log
SlurmdLogFile={b}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
SlurmdTimeout={self.slurmd_timeout}
NodeName={self.nodelist} NodeAddr={addrs} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.nodelist} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

    def _cleanup_stale(self) -> None:
        """Stop daemons an interrupted earlier run left, found by this cluster's pid files (and checked by cmdline)."""
        for pidfile in [self.base / "slurmctld.pid", *self.base.glob("slurmd-*.pid")]:
            try:
                pid = int(pidfile.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            if str(self.conf) in cmdline:
                stop_pid(pid, timeout=5)

    def start(self) -> SlurmNetnsCluster:
        for exe in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo"):
            if shutil.which(exe) is None and not Path("/usr/sbin", exe).exists():
                raise Unavailable(f"{exe} not found: bash cluster/install_local_slurm.sh installs slurm-wlm and munge")
        self._cleanup_stale()
        for d in ("state", "spool"):
            shutil.rmtree(self.base / d, ignore_errors=True)
        for f in self.base.glob("*.log"):
            f.unlink()
        for i in range(1, self.nodes.count + 1):
            (self.base / "spool" / self.nodes.name(i)).mkdir(parents=True, exist_ok=True)
        (self.base / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._conf_text())
        try:
            self._munge_pid = start_munge()
            # -D: in the foreground, so the pid is ours to stop; -i: ignore state a stale run saved
            self._ctld = subprocess.Popen(
                ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)],
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(1, self.nodes.count + 1):
                self.start_slurmd(i, wait=False)
            self.wait_idle(range(1, self.nodes.count + 1))
        except BaseException:
            self.stop()
            raise
        return self

    def start_slurmd(self, i: int, wait: bool = True) -> None:
        """(Re)start node i's slurmd, e.g. after ``lose_node``: the node comes back and registers again."""
        self.nodes.link(i, up=True)
        name = self.nodes.name(i)
        self._slurmd[i] = self.nodes.popen(
            i,
            ["/usr/sbin/slurmd", "-D", "-N", name, "-f", str(self.conf)],
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait_idle([i])

    def scontrol(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["scontrol", *args], capture_output=True, text=True, timeout=60, env=self.env(), check=check
        )

    def node_states(self) -> dict[str, str]:
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=60, env=self.env()
        )
        return dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line)

    def wait_idle(self, which, timeout: float = 60) -> None:
        names = [self.nodes.name(i) for i in which]
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._ctld is not None and self._ctld.poll() is not None:
                raise Unavailable(f"slurmctld exited ({self._ctld.returncode}); see {self.base}/slurmctld.log")
            states = self.node_states()
            if all(states.get(n, "").rstrip("*") in ("idle", "mixed") for n in names):
                return
            for n in names:
                if states.get(n, "").startswith(("down", "drain")):
                    self.scontrol("update", f"NodeName={n}", "State=RESUME")
            time.sleep(0.5)
        raise Unavailable(f"nodes {names} never became idle: {self.node_states()} (logs in {self.base})")

    def lose_node(self, i: int) -> list[int]:
        """Node i fails: its link is cut and its slurmd and job processes are killed by pid."""
        self._slurmd.pop(i, None)
        return self.nodes.kill_node(i)

    def job_state(self, job: str) -> str:
        for tok in self.scontrol("show", "job", job).stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return ""

    def show_job(self, job: str) -> str:
        return self.scontrol("show", "job", job).stdout

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop every slurmd and slurmctld by pid, and munged if started here."""
        if self._ctld is not None and self._ctld.poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, timeout=30, env=self.env())
        for proc in self._slurmd.values():
            terminate_wrapped(proc, timeout=10)
        self._slurmd.clear()
        if self._ctld is not None:  # our child: Popen's wait, not kill(pid, 0), which a zombie passes
            self._ctld.terminate()
            try:
                self._ctld.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._ctld.kill()
                self._ctld.wait(timeout=10)
            self._ctld = None
        stop_pid(self._munge_pid)
        self._munge_pid = None

    def __enter__(self) -> SlurmNetnsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SshNodes:
    """An sshd on every node of a :class:`NetnsNodes`: machines the way a cluster launcher (``ray up``) expects them.

    Each node gets key-only ssh login as this user (a key pair generated here, ``client_key``) and, in its
    mount namespace only, what separate machines have of their own: a private home (``base/nodeI/home``
    bind-mounted over ``$HOME``: what ``ray up`` copies to ``~`` lands per node), a private ``/tmp``
    (``base/nodeI/tmp``: Ray's session directory and Unix sockets, the local provider's state file) and a
    copy-on-write view of this Python installation (overlayfs over ``sys.prefix``, the writes kept in
    ``base/nodeI/python``), so that a node's ``pip install`` cannot change this machine's environment.
    Everything else, e.g. ``base/shared``, is shared like NFS; ``base`` must therefore not lie under /tmp.
    The nodes have no route off the bridge: pip is told not to use an index nor build isolation
    (``PIP_NO_INDEX=1``, ``PIP_NO_BUILD_ISOLATION=0``, pip's inverted spelling of "off") in the node's
    ``~/.bashrc``, which also puts this Python's ``bin`` first on ``PATH``.

    ``client_home()`` is a home for the machine that runs ``ray up`` (the root namespace), with the key in
    ``~/.ssh``; ``client_command()`` wraps a command to run there with that home and its own /tmp.
    """

    def __init__(self, nodes: NetnsNodes, base: Path) -> None:
        self.nodes, self.base = nodes, Path(base).resolve()
        if self.base == Path("/tmp") or Path("/tmp") in self.base.parents:
            raise ValueError(f"{self.base}: under /tmp, which every node replaces with its own")
        self.home = Path.home()
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.client_key = self.base / "client" / "home" / ".ssh" / "id_ed25519"
        self._sshd: dict[int, subprocess.Popen] = {}

    @staticmethod
    def check_available() -> None:
        for exe in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync"):
            if shutil.which(exe) is None:
                raise Unavailable(
                    f"{exe} not found: bash cluster/install_local_slurm.sh installs openssh-server and rsync"
                )

    def node_dir(self, i: int) -> Path:
        return self.base / self.nodes.name(i)

    def node_home(self, i: int) -> Path:
        """Node i's ``~`` as seen from outside the node."""
        return self.node_dir(i) / "home"

    def client_home(self) -> Path:
        return self.base / "client" / "home"

    def client_command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` on the launching machine: HOME is :meth:`client_home`, /tmp is private (``ray up`` keeps its
        cluster state, config cache and ssh control sockets there), the network is this machine's."""
        tmp = self.base / "client" / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        steps = []
        cwd = Path(__file__).resolve().parents[1]  # the checkout, where `ray up` resolves the YAML's `.`
        if Path("/tmp") in cwd.parents:  # a checkout under /tmp (a CI clone): keep it visible at its own path
            holder = self.base / "client" / "checkout"
            holder.mkdir(parents=True, exist_ok=True)
            steps += [f"mount --bind {cwd} {holder}"]
            late = [f"mkdir -p {cwd}", f"mount --bind {holder} {cwd}", f"cd {cwd}"]
        else:
            late = []
        steps += [f"mount --bind {tmp} /tmp", *late, f"export HOME={self.client_home()}", 'exec "$@"']
        return ["unshare", "--mount", "--", "sh", "-c", " && ".join(steps), "sh", *argv]

    def _prefixes(self) -> list[Path]:
        return list(dict.fromkeys(Path(p).resolve() for p in (sys.prefix, sys.base_prefix)))

    def _boot(self, i: int) -> str:
        """The node's mounts, then sshd in the foreground (so its pid is the one :meth:`stop` ends)."""
        d = self.node_dir(i)
        lines = ["set -e", f"mount --bind {d / 'tmp'} /tmp"]
        for k, prefix in enumerate(self._prefixes()):
            up, work = d / "python" / f"upper{k}", d / "python" / f"work{k}"
            lines.append(f"mount -t overlay overlay -o lowerdir={prefix},upperdir={up},workdir={work} {prefix}")
            if self.home in prefix.parents:  # keep the Python installation visible under the private home
                lines.append(f"mount --bind {prefix} {self.node_home(i) / prefix.relative_to(self.home)}")
        lines.append(f"mount --rbind {self.node_home(i)} {self.home}")
        lines.append(f"exec /usr/sbin/sshd -D -e -f {d / 'sshd_config'}")
        return "\n".join(lines)

    def _prepare(self, i: int, pub: str) -> None:
        d, home = self.node_dir(i), self.node_home(i)
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("tmp", "python"):
            (d / sub).mkdir(parents=True)
        os.chmod(d / "tmp", 0o1777)
        for k, prefix in enumerate(self._prefixes()):
            (d / "python" / f"upper{k}").mkdir()
            (d / "python" / f"work{k}").mkdir()
            if self.home in prefix.parents:
                (home / prefix.relative_to(self.home)).mkdir(parents=True)
        (home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text(pub)
        bin_dir = Path(sys.executable).parent
        (home / ".bashrc").write_text(
            "# written by tests/netns_cluster.py SshNodes: this machine's Python first; the node is offline\n"
            f'export PATH="{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"\n'
            "export PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0 PIP_DISABLE_PIP_VERSION_CHECK=1\n"
        )
        (home / ".profile").write_text('[ -n "$BASH" ] && [ -f ~/.bashrc ] && . ~/.bashrc\n')
        (d / "sshd_config").write_text(
            f"""# written by tests/netns_cluster.py SshNodes
Port 22
ListenAddress {self.nodes.addr(i)}
HostKey {self.base / "host_key"}
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
MaxStartups 100
MaxSessions 100
LogLevel ERROR
Subsystem sftp internal-sftp
"""
        )

    def start(self, timeout: float = 30) -> SshNodes:
        self.check_available()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        keydir = self.client_key.parent
        shutil.rmtree(self.base / "client", ignore_errors=True)
        keydir.mkdir(parents=True, mode=0o700)
        (self.base / "host_key").unlink(missing_ok=True)
        (self.base / "host_key.pub").unlink(missing_ok=True)
        for key in (self.client_key, self.base / "host_key"):
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        pub = self.client_key.with_suffix(".pub").read_text()
        try:
            for i in range(1, self.nodes.count + 1):
                self._prepare(i, pub)
                with open(self.node_dir(i) / "sshd.log", "w") as log:  # the child keeps its own copy
                    self._sshd[i] = self.nodes.popen(
                        i, ["sh", "-c", self._boot(i)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                    )
            for i in range(1, self.nodes.count + 1):
                self.wait_ssh(i, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ssh_command(self, i: int, command: str) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.client_key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            f"{self.user}@{self.nodes.addr(i)}",
            command,
        ]

    def wait_ssh(self, i: int, timeout: float = 30) -> None:
        """Until ``ssh user@node`` runs a command on node i (its hostname comes back)."""
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            proc = self._sshd.get(i)
            if proc is not None and proc.poll() is not None:
                log = (self.node_dir(i) / "sshd.log").read_text()[-2000:]
                raise Unavailable(f"sshd on {self.nodes.name(i)} exited ({proc.returncode}): {log}")
            r = subprocess.run(self.ssh_command(i, "hostname"), capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and r.stdout.strip() == self.nodes.name(i):
                return
            last = (r.stdout + r.stderr).strip()
            time.sleep(0.3)
        raise Unavailable(f"no ssh login on {self.nodes.name(i)} within {timeout:.0f} s: {last}")

    def client_pids(self) -> list[int]:
        """Processes outside the nodes that use this helper's key: ssh control masters ``ray up`` left."""
        key = str(self.client_key).encode()
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if key in argv:
                out.append(int(d.name))
        return out

    def stop(self) -> None:
        """Stop each node's sshd (and with its PID namespace whatever it started) and the ssh clients by pid."""
        for proc in self._sshd.values():
            terminate_wrapped(proc, timeout=10)
        self._sshd.clear()
        _kill_all(self.client_pids())

    def __enter__(self) -> SshNodes:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
