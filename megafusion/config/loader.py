"""YAML presets + ``key.sub=value`` overrides -> a typed :class:`Config`.

Typing is strict on purpose: an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the key, never a silently ignored setting that a
cluster run discovers hours later.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from megafusion.config.schema import Config
from megafusion.durable import write_text

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the values at fault."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_source(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"unknown preset {name_or_path!r}; presets: {', '.join(list_presets())} (or pass a path to a .yaml file)"
        )
    return preset


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None (or Optional[X])
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            return str(value)
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


MOVED_KEYS = {("model", "params_dtype"): ("parallel", "params_dtype")}
"""Keys an earlier release had elsewhere (old checkpoints' config.yaml, users' YAML): read with a warning."""


def _migrate(data: dict, source: str) -> dict:
    """Move keys of :data:`MOVED_KEYS` to their new place, so an old checkpoint's config.yaml still loads."""
    for (old_sec, old_key), (new_sec, new_key) in MOVED_KEYS.items():
        section = data.get(old_sec)
        if not isinstance(section, dict) or old_key not in section:
            continue
        data = {**data, old_sec: {k: v for k, v in section.items() if k != old_key}}
        new = data.get(new_sec) if isinstance(data.get(new_sec), dict) else {}
        if new_key not in new:
            data[new_sec] = {**new, new_key: section[old_key]}
        warnings.warn(
            f"{source}: {old_sec}.{old_key} is now {new_sec}.{new_key}; read it from there (rename the key)",
            FutureWarning,
            stacklevel=3,
        )
    return data


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys under "
            f"{prefix.rstrip('.') or 'the root'}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``["model.hidden_size=64", "parallel.sequence_parallel=true"]`` -> nested dict."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return nested


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> Config:
    """Load a preset name or YAML path, apply overrides, return a typed Config.

    Presets may say ``base: other_preset`` to start from another preset.
    Validation of cross-field rules is separate (``validate.validate_config``)
    because some of them need the world size.
    """
    data = _load_yaml_chain(_resolve_source(name_or_path), seen=())
    data = _merge(_migrate(data, name_or_path), _migrate(parse_overrides(overrides), "override"))
    return _build(Config, data)


def _load_yaml_chain(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        data = _merge(_load_yaml_chain(_resolve_source(str(base)), seen + (path,)), data)
    return data


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "config") -> Config:
    return _build(Config, _migrate(data, source))


def dump_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
