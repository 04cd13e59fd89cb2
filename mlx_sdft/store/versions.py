"""The adapter versions under --home, as `serve` reads them (part 2 writes them):

    HOME/current.json                        {"version": N}   (missing, or N = 0: no adapters)
    HOME/versions/0001/adapter_config.json   a plain mlx-lm adapter folder, one per version
    HOME/versions/0001/adapters.safetensors

`current.json` is replaced atomically (written aside, then renamed), so a reader sees the old
pointer or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_sdft.errors import InputError

CURRENT = "current.json"
VERSIONS = "versions"


def version_dir(home: str | Path, version: int) -> Path:
    return Path(home).expanduser() / VERSIONS / f"{version:04d}"


def current(home: str | Path) -> int:
    """The current version number; 0 (the base model) when there is no pointer yet.
    InputError when the pointer is unreadable or names a folder that is not an adapter folder."""
    path = Path(home).expanduser() / CURRENT
    try:
        version = json.loads(path.read_text())["version"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InputError(f"{path}: version must be an integer >= 0, got {version!r}")
    if version and not (version_dir(home, version) / "adapter_config.json").is_file():
        raise InputError(f"{path}: version {version} has no adapter folder {version_dir(home, version)}")
    return version


def set_current(home: str | Path, version: int) -> None:
    """Point current.json at `version` in one atomic rename (a rollback is this call too)."""
    path = Path(home).expanduser() / CURRENT
    tmp = path.with_name(f".{CURRENT}.{os.getpid()}")
    tmp.write_text(json.dumps({"version": version}) + "\n")
    with open(tmp, "rb") as fid:
        os.fsync(fid.fileno())
    os.replace(tmp, path)
