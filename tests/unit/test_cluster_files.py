"""The cluster files users submit: Ray's own schema accepts the cluster YAML; the SLURM scripts parse."""

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # what `ray up` runs first; raises on a bad field
    assert any("pip install" in c and "megafusion" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    # what Ray 2.60's local provider needs (tests/e2e/test_ray_multinode.py runs the file): the v1 autoscaler,
    # which launches the listed workers; one token on every node and token mode on both sides of the join
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start --head" in c)
    worker = next(c for c in cfg["worker_start_ray_commands"] if "ray start --address" in c)
    assert "RAY_enable_autoscaler_v2=0" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    # `ray down` stops only the head: a blocking worker start stops the worker's Ray once the head is gone
    assert "--block" in worker and worker.rstrip().endswith("&") and "RAY_gcs_rpc_server_reconnect_timeout_s" in worker
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cfg["file_mounts"]["~/megafusion"] == "." and "~/megafusion" in cfg["setup_commands"][0]


def test_slurm_scripts_are_valid_bash_with_the_documented_directives():
    for name, nodes in (("train_70b.slurm", "32"), ("train_8b.slurm", "8")):
        path = ROOT / "cluster" / name
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        directives = [ln.split(None, 1)[1] for ln in path.read_text().splitlines() if ln.startswith("#SBATCH")]
        assert f"--nodes={nodes}" in directives and "--requeue" in directives
        assert "--signal=B:USR1@600" in directives and "--gres=gpu:8" in directives
    assert subprocess.run(["bash", "-n", str(ROOT / "cluster" / "train_common.sh")]).returncode == 0


def test_preemption_lead_matches_the_signal_directive():
    """The lead time the trainer compares its saves with is the one SLURM will give."""
    import re

    for name in ("train_70b.slurm", "train_8b.slurm"):
        text = (ROOT / "cluster" / name).read_text()
        signal_lead = re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1)
        assert re.search(rf"^PREEMPT_LEAD_S={signal_lead}\b", text, re.M), name
    common = (ROOT / "cluster" / "train_common.sh").read_text()
    assert 'export MEGAFUSION_PREEMPT_LEAD_S="${MEGAFUSION_PREEMPT_LEAD_S:-${PREEMPT_LEAD_S:-600}}"' in common
