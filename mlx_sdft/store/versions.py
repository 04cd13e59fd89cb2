"""The adapter versions under --home, as `serve` reads them and `learn` writes them:

    HOME/current.json                        {"version": N}   (missing, or N = 0: no adapters)
    HOME/versions/0001/adapter_config.json   a plain mlx-lm adapter folder, one per version
    HOME/versions/0001/adapters.safetensors
    HOME/versions/0001/record.json           lineage: parent, lessons, options, gate, files' sha256
    HOME/versions/.tmp-0002-PID/             a candidate being built (renamed to 0002 when done)
    HOME/learn.lock                          held (flock) by the one learn/rollback/forget running

`current.json` is replaced atomically (written aside, then renamed), so a reader sees the old
pointer or the new one, never half of one. A version folder is complete before it gets its
number (built under a temporary name, then renamed) and never changes afterwards, except that
`forget` erases the weights of versions that learned a deleted lesson (the record says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from mlx_sdft import atomic
from mlx_sdft.errors import InputError, TrainingError
from mlx_sdft.folder_lock import held
from mlx_sdft.store.db import existing_home

CURRENT = "current.json"
VERSIONS = "versions"
RECORD = "record.json"
LOCK = "learn.lock"
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")  # what serve and mlx-lm read


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
        raise InputError(
            f"{path}: version {version} has no adapter folder {version_dir(home, version)}"
        )
    return version


def set_current(home: str | Path, version: int) -> None:
    """Point current.json at `version` in one atomic rename (a rollback is this call too)."""
    _write_json(Path(home).expanduser() / CURRENT, {"version": version}, indent=None)


def _write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Written aside, fsynced, renamed (`atomic`): a reader (or a kill -9) never sees half a file."""
    atomic.write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fid:
        for block in iter(lambda: fid.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def numbers(home: str | Path) -> list[int]:
    """The finished versions, oldest first."""
    root = Path(home).expanduser() / VERSIONS
    return sorted(
        int(p.name) for p in root.glob("[0-9][0-9][0-9][0-9]*") if p.name.isdigit() and p.is_dir()
    )


def record(home: str | Path, version: int) -> dict:
    """Version 0 is the base model: no adapters, no lessons."""
    if version == 0:
        return {
            "version": 0,
            "parent": None,
            "accepted": True,
            "includes": [],
            "lessons": [],
            "replayed": [],
        }
    path = version_dir(home, version) / RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (
            path.parent / "adapter_config.json"
        ).is_file():  # adapters put there by hand or another tool
            return {
                "version": version,
                "parent": None,
                "accepted": True,
                "includes": [],
                "lessons": [],
                "replayed": [],
                "why": "not built by learn (no record.json)",
            }
        raise InputError(
            f"version {version}: no such version in {Path(home).expanduser() / VERSIONS}"
        ) from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def records(home: str | Path) -> list[dict]:
    return [record(home, n) for n in numbers(home)]


def update_record(home: str | Path, version: int, **fields) -> dict:
    rec = {**record(home, version), **fields}
    _write_json(version_dir(home, version) / RECORD, rec)
    return rec


def next_number(home: str | Path) -> int:
    """One past every finished version and every candidate folder still on disk."""
    root = Path(home).expanduser() / VERSIONS
    started = [
        int(p.name.split("-")[1]) for p in root.glob(".tmp-*-*") if p.name.split("-")[1].isdigit()
    ]
    return max([0, *numbers(home), *started]) + 1


def start_candidate(home: str | Path, version: int) -> Path:
    """An empty folder to build version `version` in, under a name `serve` never reads."""
    folder = Path(home).expanduser() / VERSIONS / f".tmp-{version:04d}-{os.getpid()}"
    folder.mkdir(parents=True)
    return folder


def clean_candidates(home: str | Path) -> list[str]:
    """Remove the candidate folders of killed runs (call with the lock held); their names."""
    root = Path(home).expanduser() / VERSIONS
    gone = []
    for folder in root.glob(".tmp-*"):
        shutil.rmtree(folder, ignore_errors=True)
        gone.append(folder.name)
    return gone


def finish_candidate(home: str | Path, folder: Path, version: int, rec: dict) -> Path:
    """Record the adapter files' sha256, write record.json, and give the folder its number."""
    rec = {
        **rec,
        "version": version,
        "files": {name: sha256(folder / name) for name in ADAPTER_FILES},
    }
    _write_json(folder / RECORD, rec)
    target = version_dir(home, version)
    os.replace(folder, target)
    return target


def verify(home: str | Path, version: int) -> dict:
    """The record of an accepted version whose adapter files are still the ones it was built with;
    InputError otherwise (rejected, erased, or changed on disk)."""
    rec = record(home, version)
    if version == 0:
        return rec
    if not rec.get("accepted"):
        raise InputError(
            f"version {version}: was rejected by the gate ({rec.get('reason', 'no reason recorded')})"
        )
    if rec.get("erased"):
        raise InputError(f"version {version}: its weights were erased ({rec['erased']})")
    for name, digest in rec.get("files", {}).items():
        path = version_dir(home, version) / name
        if not path.is_file() or sha256(path) != digest:
            raise InputError(
                f"{path}: missing or changed since version {version} was built (sha256 differs)"
            )
    return rec


def model_of(home: str | Path, exchange_models: list[str] = ()) -> str | None:
    """The model this home is about: the current version's (else the newest version's) base
    model, else the model `serve` answered the newest exchange with; None when neither says."""
    now, known = current(home), records(home)
    for r in ([record(home, now)] if now else []) + known[::-1]:
        if r.get("model"):
            return r["model"]
    return next(iter(exchange_models), None)


def located(model: str) -> str:
    """A local model path made absolute: a record or preflight outlives the directory its command
    ran in, and a later learn or forget reads its model from there (pkg: specs and hub ids stay)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if not model.startswith("pkg:") and path.exists() else model


def lineage(home: str | Path, version: int) -> list[int]:
    """version, its parent, its parent's parent ... down to 0."""
    chain = [version]
    while chain[-1]:
        chain.append(record(home, chain[-1])["parent"] or 0)
    return chain


def erase(home: str | Path, version: int, why: str) -> None:
    """Delete a version's weights (the record stays, saying why)."""
    (version_dir(home, version) / "adapters.safetensors").unlink(missing_ok=True)
    update_record(home, version, erased=why)


@contextmanager
def locked(home: str | Path):
    """One learn, rollback or forget at a time per --home: an exclusive flock on HOME/learn.lock,
    which holds the owner's pid. The kernel drops the flock when its process dies (kill -9
    included), so a lock file left by a killed run is stale by construction: the next run takes
    it over and yields that pid (else None). A live holder: TrainingError naming its pid.
    A --home that does not exist: InputError (a mistyped one is not created, with the wrong mode).
    Every file and folder created meanwhile (versions, records, the training run) is readable by
    you only: the process's umask is 077 for the block."""
    path = existing_home(home) / LOCK
    with (
        private(),
        held(
            path,
            lambda holder: TrainingError(
                f"{path}: another learn, rollback or forget is running "
                f"(pid {holder}); try again when it is done"
            ),
        ) as stale,
    ):
        yield stale


@contextmanager
def private():
    """Files created in the block are 0600 and folders 0700 (umask 077), whatever the caller's umask."""
    before = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(before)
