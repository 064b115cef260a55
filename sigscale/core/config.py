"""The one config loader: dataclass schemas from YAML, ``compose:`` parts, dot-list overrides, loud errors.

Every stage's config (experiment, curation, evaluation job) goes through :func:`load`. A YAML may
start with ``compose: [models/x.yaml, train/y.yaml]``: those parts (paths relative to the YAML's
folder, then to the repo's ``configs/``) merge first, in order, then the file itself, then the
command-line overrides (``train.batch_size=32768``). An unknown key names the closest known one; a
wrong type names the key and the expected type. Stages validate their own combinations afterwards.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sigscale import CONFIG_DIR
from sigscale.core.errors import SigscaleError

T = TypeVar("T")
# A stage hook run on the merged YAML before it meets the schema (e.g. expanding model.preset).
Prepare = Callable[[DictConfig, str], DictConfig]


class ConfigError(SigscaleError, ValueError):
    """A config is wrong: the message names the key and the fix."""


def choice(value: str, options: Sequence[str], key: str) -> None:
    """Refuse a value outside ``options``, naming the key and the allowed values."""
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}; set {key} to one of them")


def known_keys(schema: Any, prefix: str = "") -> List[str]:
    """Every dotted key of a dataclass schema, nested sections included."""
    keys = []
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(factory):
            keys += known_keys(factory, prefix + f.name + ".")
    return keys


def explain(e: OmegaConfBaseException, source: str, schema: Any) -> ConfigError:
    """A ConfigError naming the key, the problem and the fix."""
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        close = difflib.get_close_matches(key, known_keys(schema), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"see {schema.__name__} in {schema.__module__} for the schema"
        return ConfigError(f"unknown config key '{key}' in {source}; {hint}")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"wrong type for config key '{key}' in {source}: {msg}; fix the value's type")
    return ConfigError(f"invalid config in {source} at '{key}': {str(e).splitlines()[0]}")


def find_config(name: str | Path, folders: Sequence[str] = ("",)) -> Path:
    """A YAML path, or a name (with or without ``.yaml``) in one of ``configs/<folder>``."""
    p = Path(name)
    bases = [Path()] + [CONFIG_DIR / f for f in folders] + [CONFIG_DIR]
    for base in bases:
        for candidate in (base / p, base / f"{p}.yaml"):
            if candidate.is_file():
                return candidate
    where = ", ".join(str(CONFIG_DIR / f) for f in folders)
    raise ConfigError(f"config {name} does not exist; give a YAML path or a name from {where}")


def _resolve_part(name: str, base_dir: Path) -> Path:
    for candidate in (base_dir / name, CONFIG_DIR / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config part {name!r} not found next to {base_dir} nor in {CONFIG_DIR}; "
                      "fix the path in 'compose:' or pass an existing YAML file")


def load_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """One YAML and everything it composes, parts first."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path} composes itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry the line number
        raise ConfigError(f"cannot parse config {path}: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    parts = node.pop("compose", [])
    merged = OmegaConf.create()
    for part in parts:
        merged = OmegaConf.merge(merged, load_yaml(_resolve_part(part, path.parent), seen + (path.resolve(),)))
    return OmegaConf.merge(merged, node)


def _to_schema(schema: Type[T], node: DictConfig, source: str) -> T:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        raise explain(e, source, schema) from None


def load(schema: Type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
         folders: Sequence[str] = ("",), prepare: Optional[Prepare] = None) -> T:
    """``schema`` filled from a YAML (found by :func:`find_config`), its composed parts and dot-list overrides."""
    source = str(path) if path else "<defaults>"
    node = load_yaml(find_config(path, folders)) if path else OmegaConf.create()
    try:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}; use key.sub=value") from e
    if overrides:
        source += " + overrides"
    if prepare is not None:
        node = prepare(node, source)
    return _to_schema(schema, node, source)


def from_yaml(schema: Type[T], text: str, source: str = "<yaml>") -> T:
    """Rebuild a config from :func:`to_yaml` output (e.g. a run's config.yaml)."""
    return _to_schema(schema, OmegaConf.create(text), source)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (dataclass or plain dict), for manifests and reports."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
