"""Settings files and layers of settings: reading a TOML / YAML / JSON table, checking its keys,
and merging layers (defaults < saved run < config file < flags).

Used by ``cola train`` (:mod:`cola.llm.settings`, :mod:`cola.llm.cli`) and ``cola sweep``.
"""

from __future__ import annotations

import json

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML files need Python 3.11 (YAML and JSON work)
    tomllib = None
from pathlib import Path
from typing import Any

from cola.errors import ConfigError, closest

__all__ = ["read_config_file", "merge", "checked"]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a TOML or YAML file.

    Raises:
        ConfigError: a missing file, an unknown extension, a syntax error (with its line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            if tomllib is None:
                raise ConfigError(f"config file {str(path)!r}: reading TOML needs Python 3.11 or newer; "
                                  "use a .yaml or .json file")
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(path)!r}: unknown extension {path.suffix!r}; "
                              "use .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError, json errors
        raise ConfigError(f"config file {str(path)!r} is not valid {suffix.lstrip('.').upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a table of settings, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``top``; the ``chain`` tables are merged key by key."""
    out = dict(base)
    for key, value in top.items():
        if key == "chain" and isinstance(out.get("chain"), dict) and isinstance(value, dict):
            out["chain"] = {**out["chain"], **value}
        else:
            out[key] = value
    return out


def checked(data: dict[str, Any], source: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``data`` with keys normalised (``-`` -> ``_``), ``chain.links`` lifted; unknown keys are errors.

    ``allowed``: the keys that may appear (e.g. :data:`cola.llm.settings.FILE_KEYS`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of settings, got {type(data).__name__}")
    out: dict[str, Any] = {}
    problems = []
    spelled: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            problems.append(f"{source}: unknown setting {key!r} (closest: {', '.join(closest(name, allowed))})")
            continue
        if name in spelled:
            problems.append(f"{source}: {spelled[name]!r} and {key!r} are the same setting; give it once")
        spelled[name] = key
        out[name] = value
    chain = out.get("chain")
    if isinstance(chain, dict):
        names = [str(k).replace("-", "_") for k in chain]
        problems += [f"{source}: chain.{n} is given twice (with - and _); give it once"
                     for n in sorted({n for n in names if names.count(n) > 1})]
        chain = {str(k).replace("-", "_"): v for k, v in chain.items()}
        if "links" in chain:
            links = chain.pop("links")
            if "links" in out and out["links"] != links:
                problems.append(f"{source}: links={out['links']!r} and chain.links={links!r} disagree; give one")
            out["links"] = links
        out["chain"] = chain
    if problems:
        raise ConfigError(problems)
    return out
