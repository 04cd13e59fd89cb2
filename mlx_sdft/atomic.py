"""A file replaced whole or not at all: written under a temporary name beside it, fsynced, then
renamed over it (os.replace). A reader, a full disk or a kill -9 never sees half a file; a write
that fails leaves the old file as it was and no temporary behind. Every such write in the package
goes through `write`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def write(path: Path, write_to: Callable[[Path], object]) -> None:
    """`write_to(tmp)` writes the new contents to `.tmp-PID-NAME` beside `path` (the real suffix
    kept: mx.save_safetensors appends one otherwise), which is fsynced and renamed over `path`."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write_to(tmp)
        with open(tmp, "rb+") as fid:
            os.fsync(fid.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, the folder created when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, indent=2) + "\n")
