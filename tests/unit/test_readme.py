"""README stays true: every file, module and config key it names exists."""

import dataclasses
import importlib.util
import re
from pathlib import Path

from megafusion.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_named_files_exist():
    paths = set(re.findall(r"\b((?:tools|benchmarks|cluster|launcher|megafusion|tests)/[\w/.-]*\w)", README))
    assert paths
    missing = [p for p in paths if not p.endswith("_") and not (ROOT / p).exists()]  # `bench_*.py` is a glob
    assert not missing, missing


def test_named_modules_exist():
    mods = set(re.findall(r"python -m ([\w.]+)", README))
    assert "launcher.train" in mods and "launcher.demo" in mods
    for mod in mods - {"pytest", "torch.distributed.run", "deepspeed.checkpoint.ds_to_universal"}:
        assert importlib.util.find_spec(mod) is not None, mod


def _has_key(path: str) -> bool:
    node = Config()
    for part in path.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def test_named_config_keys_exist():
    keys = set(re.findall(r"`((?:model|parallel|data|optim|diffusion|checkpoint|logging)\.[a-z_.]+?)(?:[=`/])", README))
    assert len(keys) > 10
    missing = sorted(k for k in keys if not _has_key(k.rstrip(".")))
    assert not missing, missing
