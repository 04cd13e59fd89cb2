"""Options in a YAML file: read and checked against an options class, with relative paths
taken from the file's folder (one rule for `-c` files and the stages of `continual`)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import yaml

from mlx_sdft.errors import InputError


def read_yaml(path: str | Path, cls: type | None = None) -> dict:
    """A YAML mapping; with an options class `cls`, every key must be one of its options, and
    its path options go through `resolve_paths`. InputError naming the file (and line) if not."""
    try:
        with open(path, encoding="utf-8") as fid:
            values = yaml.safe_load(fid) or {}
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise InputError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: a config file must be a mapping of option: value")
    if cls is None:
        return values
    known, retired = {f.name for f in dataclasses.fields(cls)}, getattr(cls, "RETIRED", {})
    for key in values:
        if key not in known | retired.keys():
            raise InputError(f"{path}: unknown option {key!r}")
    values = drop_retired(values, retired, lambda key: f"{path}:{key_line(path, key)}: {key}")
    return resolve_paths(values, path, cls)


def drop_retired(values: dict, retired: dict[str, str], where: Callable[[str], str]) -> dict:
    """`values` without the retired options (`retired`: name → what runs instead), one line on
    stderr for each that was there, named by `where(name)`: accepted for one release, ignored."""
    for key in sorted(retired.keys() & values.keys()):
        print(
            f"mlx-sdft: {where(key)}: deprecated and ignored: {retired[key]} (the option goes in the next release)",
            file=sys.stderr,
        )
    return {k: v for k, v in values.items() if k not in retired}


def resolve_paths(values: dict, yaml_file: str | Path, cls: type) -> dict:
    """`values` with each relative path option of `cls` (a field declared with path=True) taken
    from the YAML file's folder, where it exists there (as a recipe expects); all else as given."""
    base, paths = (
        Path(yaml_file).parent,
        {f.name for f in dataclasses.fields(cls) if f.metadata["path"]},
    )
    out = dict(values)
    for key in paths & values.keys():
        value = values[key]
        if (
            isinstance(value, str)
            and "\n" not in value
            and not Path(value).is_absolute()
            and (base / value).exists()
        ):
            out[key] = str(base / value)
    return out


def key_line(path: str | Path, key: str) -> str:
    """The line of a top-level key in a YAML file, for messages ("?" if it cannot be found again)."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "?"
    for k, _ in node.value if isinstance(node, yaml.MappingNode) else []:
        if getattr(k, "value", None) == key:
            return str(k.start_mark.line + 1)
    return "?"
