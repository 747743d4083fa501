"""The shipped cluster/ray_cluster.yaml on two network-namespace nodes, driven the way the README says.

node1 (198.18.1.11) and node2 (198.18.1.12) are namespaces of tests/netns_cluster.py, each with an sshd
(key login with a key generated here), its own home, /tmp and copy-on-write Python (SshNodes); the root
namespace is the user's machine. The YAML is the shipped one with only the fields its header names edited:
head and worker IPs, ssh user, key path. Then, in order, with Ray's local (on-prem) provider:

1. ``ray get-auth-token --generate`` and ``ray up``: the head on node1, the autoscaler starts the worker on
   node2 over ssh (both run the YAML's file mounts and ``pip install -e ~/megafusion``);
2. the documented ``ray submit cluster/ray_cluster.yaml tools/precompute_latents.py -- --address auto
   --input '<brace pattern>' ...``: encoder actors on both nodes (node ids in the summary and the log),
   every good sample exactly once, the bad ones counted;
3. node2's Ray lost while its actor encodes a shard (its raylet and every Ray worker there SIGKILLed; the
   raylet alone is not enough: a running actor then goes on serving its caller): the job ends on node1 (or
   a rerun completes it), nothing lost or duplicated, and a rerun encodes nothing;
4. the head's autoscaler restarts Ray on node2 over ssh; then ``ray down``: no Ray process left on the head
   nor on the worker (every pid in the nodes' namespaces is checked): ``ray down`` runs ``ray stop`` on the
   head only; the worker's raylet exits once the head is gone and its ``ray start --block`` stops the rest.

Everything started is stopped by pid and the namespaces are removed, also on failure; without root,
namespaces, sshd or rsync the tests skip and say why. The module takes ~2.7 minutes here (2 CPU cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_precompute import _bomb_png, _png, _read_output
from tests.netns_cluster import NetnsNodes, SshNodes
from tests.slurm_cluster import Unavailable

ROOT = Path(__file__).resolve().parents[2]
BASE = Path("/var/tmp/megafusion-netns-ray")  # fixed (a rerun finds an interrupted run's leftovers); not /tmp:
SHARED = BASE / "shared"  # every node has its own /tmp; this is the "NFS" all of them see
RAY = str(Path(sys.executable).parent / "ray")
GOOD_SHARDS, PER_SHARD = 96, 3  # many small shards: node2 is still busy when the loss test strikes
BAD = ("missing_caption", "too_small", "decompression_bomb", "missing_image")
_NOT_INHERITED = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class RayHosts:
    """The nodes, their sshd, the cluster YAML the test uses, and ``ray`` run on the user's machine."""

    def __init__(self) -> None:
        self.nodes = NetnsNodes(2, tag="ray", subnet=1)
        self.ssh = SshNodes(self.nodes, BASE)
        self.config = BASE / "client" / "ray_cluster.yaml"
        self.baseline: dict[int, set[int]] = {}  # pids on each node before Ray: node init and sshd
        self.up = False

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        return dict(env, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")

    def ray(self, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        """``ray ARGS`` from the repository root on the user's machine (its home: the client home)."""
        kw.setdefault("capture_output", True)
        return subprocess.run(
            self.ssh.client_command([RAY, *args]), cwd=ROOT, env=self.env(), text=True, timeout=timeout, **kw
        )

    def ray_popen(self, *args: str, out: Path) -> subprocess.Popen:
        with open(out, "w") as f:
            return subprocess.Popen(
                self.ssh.client_command([RAY, *args]), cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT
            )

    def write_config(self) -> dict:
        """The shipped YAML with the fields its header says to edit, and only those, set for these nodes."""
        cfg = yaml.safe_load((ROOT / "cluster" / "ray_cluster.yaml").read_text())
        cfg["provider"]["head_ip"] = self.nodes.addr(1)
        cfg["provider"]["worker_ips"] = [self.nodes.addr(2)]
        cfg["auth"]["ssh_user"] = self.ssh.user
        cfg["auth"]["ssh_private_key"] = str(self.ssh.client_key)
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return cfg

    def ray_pids(self, i: int) -> list[int]:
        """Processes on node i beyond its init and sshd listener (sshd sessions included while they last)."""
        return sorted(set(self.nodes.pids(i)) - self.baseline.get(i, set()))

    def start(self) -> RayHosts:
        self.nodes.start()
        self.ssh.start()
        self.baseline = {i: set(self.nodes.pids(i)) for i in (1, 2)}
        return self

    def stop(self) -> None:
        if self.up:  # best effort: the nodes' PID namespaces take whatever is left down with them anyway
            try:
                self.ray("down", "-y", str(self.config), timeout=120)
            except subprocess.TimeoutExpired:
                pass
        self.ssh.stop()
        self.nodes.stop()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _write_data() -> dict:
    """GOOD_SHARDS shards of PER_SHARD generated samples, then one shard with 5 good and 6 bad members; a tiny VAE."""
    import webdataset as wds

    from megafusion.demo.shapes import samples, write_shards
    from megafusion.demo.tiny_vae import write_random_vae

    shutil.rmtree(SHARED, ignore_errors=True)
    write_shards(SHARED / "in", GOOD_SHARDS * PER_SHARD, shard_size=PER_SHARD, seed=21, size=48)
    good_png = _png((40, 40))
    bad = [
        ("bad-truncated", {"png": good_png[: len(good_png) // 2], "txt": "a cut image"}),
        ("bad-garbage", {"png": b"not an image at all", "txt": "garbage"}),
        ("bad-nocaption", {"png": good_png}),
        ("bad-small", {"png": _png((8, 8)), "txt": "tiny"}),
        ("bad-bomb", {"png": _bomb_png(), "txt": "too many pixels"}),
        ("bad-noimage", {"txt": "caption only"}),
    ]
    with wds.TarWriter(str(SHARED / "in" / f"shapes-{GOOD_SHARDS:06d}.tar")) as w:
        for s in samples(5, seed=22, size=48):
            w.write({**s, "__key__": "extra" + s["__key__"]})
        for key, parts in bad:
            w.write({"__key__": key, **parts})
    good: set[str] = set()
    for shard in sorted((SHARED / "in").glob("*.tar")):
        with tarfile.open(shard) as t:
            good |= {n.split(".")[0] for n in t.getnames() if n.endswith(".png") and not n.startswith("bad-")}
    vae = write_random_vae(SHARED / "vae", downsample=4, latent_channels=4)
    # quoted, as in the README: the head's login shell, which `ray submit` runs the command in, expands it
    pattern = str(SHARED / "in" / f"shapes-{{000000..{GOOD_SHARDS:06d}}}.tar")
    return {"good": good, "vae": vae, "pattern": pattern, "shards": GOOD_SHARDS + 1}


def _alive_nodes(hosts: RayHosts) -> list[str]:
    """Addresses of the alive Ray nodes, asked on the head through ``ray exec`` (as a user would)."""
    script = SHARED / "alive_nodes.py"
    if not script.is_file():
        SHARED.mkdir(parents=True, exist_ok=True)
        script.write_text(
            "import ray\n"
            "ray.init(address='auto', log_to_driver=False)\n"
            "print('ALIVE', ','.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))\n"
        )
    r = hosts.ray("exec", str(hosts.config), f"python {script}", timeout=120)
    for line in r.stdout.splitlines():
        if line.startswith("ALIVE "):
            return line.split(" ", 1)[1].split(",")
    return []


@pytest.fixture(scope="module")
def hosts(request) -> Iterator[RayHosts]:
    hosts = RayHosts()
    try:
        NetnsNodes.check_available()
        SshNodes.check_available()
        hosts.start()
    except Unavailable as exc:
        hosts.stop()
        pytest.skip(f"no two-node Ray cluster of namespaces: {exc}")
    failed = request.session.testsfailed
    try:
        yield hosts
    finally:
        hosts.stop()
        if request.session.testsfailed == failed:
            shutil.rmtree(BASE, ignore_errors=True)  # kept after a failure: node logs under BASE/node*/tmp/ray


@pytest.fixture(scope="module")
def data(hosts) -> dict:
    return _write_data()


def _submit_args(hosts: RayHosts, data: dict, out: Path) -> list[str]:
    """The README's command: ray submit cluster/ray_cluster.yaml tools/precompute_latents.py -- --address auto ..."""
    return [
        "submit",
        str(hosts.config),
        "tools/precompute_latents.py",
        "--",
        "--address",
        "auto",
        "--input",
        data["pattern"],
        "--output",
        str(out),
        "--vae",
        str(data["vae"]),
        "--resolution",
        "32",
        "--batch-size",
        "8",
        "--num-workers",
        "2",
        "--max-pixels",
        "200000",
    ]


def _check_output(data: dict, out: Path) -> dict:
    keys, _ = _read_output(out)
    assert len(keys) == len(set(keys)), "a sample was encoded twice"
    assert set(keys) == data["good"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_done"] == summary["shards_total"] == data["shards"]
    assert summary["out"] == len(data["good"]) and summary["in"] == len(data["good"]) + 6
    sk = summary["skipped"]
    assert all(sk.get(reason) == 1 for reason in BAD), sk
    assert sk.get("truncated_image", 0) + sk.get("corrupt_image", 0) == 2, sk
    return summary


@pytest.mark.slow
def test_ray_up_starts_the_head_on_node1_and_the_worker_on_node2(hosts):
    cfg = hosts.write_config()
    shipped = yaml.safe_load((ROOT / "cluster" / "ray_cluster.yaml").read_text())
    for section, keys in (("provider", ("head_ip", "worker_ips")), ("auth", ("ssh_user", "ssh_private_key"))):
        assert {k: v for k, v in cfg[section].items() if k not in keys} == {
            k: v for k, v in shipped[section].items() if k not in keys
        }
    assert {k: v for k, v in cfg.items() if k not in ("provider", "auth")} == {
        k: v for k, v in shipped.items() if k not in ("provider", "auth")
    }
    r = hosts.ray("get-auth-token", "--generate", timeout=60)
    assert r.returncode == 0 and (hosts.ssh.client_home() / ".ray" / "auth_token").is_file(), r.stderr
    hosts.up = True
    r = hosts.ray("up", "-y", str(hosts.config), timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # the YAML's file mounts and setup ran on the head: its own copy of the repository, installed there
    assert (hosts.ssh.node_home(1) / "megafusion" / "tools" / "precompute_latents.py").is_file()
    assert (hosts.ssh.node_home(1) / ".ray" / "auth_token").read_text() == (
        hosts.ssh.client_home() / ".ray" / "auth_token"
    ).read_text()
    # the head's autoscaler brings node2 up over ssh: file mounts, pip install, `ray start --address`
    deadline, alive = time.time() + 180, []
    while time.time() < deadline:
        if any(Path(_cmdline(p)[0]).name == "raylet" for p in hosts.nodes.pids(2) if _cmdline(p)):
            alive = _alive_nodes(hosts)
            if len(alive) == 2:
                break
        time.sleep(2)
    logs = sorted((hosts.ssh.node_dir(1) / "tmp" / "ray").glob("session_2*/logs/monitor.log"))  # node1's /tmp
    assert alive == [hosts.nodes.addr(1), hosts.nodes.addr(2)], logs[-1].read_text()[-3000:] if logs else "no log"
    assert (hosts.ssh.node_home(2) / "megafusion" / "setup.py").is_file()


@pytest.mark.slow
def test_ray_submit_encodes_on_both_nodes_every_good_sample_once(hosts, data):
    out = SHARED / "latents"
    r = hosts.ray(*_submit_args(hosts, data, out), timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"{data['shards']} input shards" in r.stdout  # the brace pattern, expanded by the head's shell
    summary = _check_output(data, out)
    nodes = summary["nodes_this_run"]  # "node_ip node_id" -> shards
    assert sorted(k.split()[0] for k in nodes) == [hosts.nodes.addr(1), hosts.nodes.addr(2)], nodes
    assert len({k.split()[1] for k in nodes}) == 2 and sum(nodes.values()) == data["shards"]
    assert f"encoded on node {hosts.nodes.addr(2)} " in r.stdout


def _ray_processes(hosts: RayHosts, i: int) -> dict[int, str]:
    """pid -> command of every Ray process on node i (its raylet, agents, workers): all but init and sshd."""
    procs = {p: " ".join(_cmdline(p)).strip() for p in hosts.ray_pids(i)}
    return {p: c for p, c in procs.items() if c and not c.startswith("sshd")}


def _encoder_on(hosts: RayHosts, i: int) -> bool:
    return any(c.startswith("ray::EncoderWorker.process") for c in _ray_processes(hosts, i).values())


@pytest.mark.slow
def test_worker_node_lost_mid_run_the_job_completes_nothing_lost_or_duplicated(hosts, data):
    out = SHARED / "latents-lost"
    log = BASE / "submit-lost.log"
    proc = hosts.ray_popen(*_submit_args(hosts, data, out), out=log)
    try:
        # strike while node2's actor is encoding a shard (Ray titles the process by the method it runs)
        deadline = time.time() + 240
        while not _encoder_on(hosts, 2):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        # node2's Ray is lost: its raylet and every Ray worker on it SIGKILLed at once (sshd stays up, so the
        # head's autoscaler may restart Ray there). Killing the raylet alone is not enough: a running actor
        # talks to its caller directly and went on encoding until the job ended (seen here).
        procs = _ray_processes(hosts, 2)
        assert any(Path(c.split()[0]).name == "raylet" for c in procs.values()), procs
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = data["shards"] - len(list(out.glob("*.done.json")))
        assert left > 0, "the job ended before node2 was lost"
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    text = log.read_text()
    died = [line for line in text.splitlines() if "worker died" in line]
    print(f"[test_ray_multinode] node2 lost with {left} shard(s) left; job rc {rc}; {died}")
    assert died, text[-4000:]
    if rc != 0:  # the tool says to rerun the same command: finished shards are skipped, the rest redone
        assert "rerun the same command" in text, text[-4000:]
        r = hosts.ray(*_submit_args(hosts, data, out), timeout=300)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    _check_output(data, out)
    r = hosts.ray(*_submit_args(hosts, data, out), timeout=300)
    assert r.returncode == 0 and "0 to encode" in r.stdout, r.stdout[-3000:]


@pytest.mark.slow
def test_ray_down_leaves_nothing_running(hosts):
    # the head's (v1) autoscaler restarts Ray on the lost worker over ssh; `ray down` must then stop both nodes
    t0, deadline = time.time(), time.time() + 150
    while not any(Path(c.split()[0]).name == "raylet" for c in _ray_processes(hosts, 2).values()):
        assert time.time() < deadline, "the autoscaler did not restart Ray on node2"
        time.sleep(1)
    print(f"[test_ray_multinode] Ray back on node2 after {time.time() - t0:.1f} s")
    t0 = time.time()
    r = hosts.ray("down", "-y", str(hosts.config), timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    hosts.up = False
    deadline = time.time() + 150
    left: dict[int, list] = {}
    while time.time() < deadline:
        left = {i: [(p, " ".join(_cmdline(p))[:120]) for p in hosts.ray_pids(i)] for i in (1, 2)}
        left = {i: v for i, v in left.items() if v}
        if not left:
            break
        time.sleep(1)
    print(f"[test_ray_multinode] {time.time() - t0:.1f} s after ray down began, left: {left}")
    assert 1 not in left, left  # the head: `ray down` runs `ray stop` there
    # the worker: its raylet exits once the head is gone (RAY_gcs_rpc_server_reconnect_timeout_s=10 in the
    # YAML) and its `ray start --block` then stops the rest (log_monitor, agents)
    assert 2 not in left, left
