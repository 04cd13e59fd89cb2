"""Reading and writing shared by the paper's recipes (recipes/tooluse, recipes/science prepare.py).

This module owns:
  - fetching the official Self-Distillation release: raw files from GitHub (following Git LFS
    pointers to media.githubusercontent.com), any URL of a folder, or a local clone
    (`location`, `Local`, `Remote`, `fetch`; `OFFICIAL` is the pinned commit);
  - reading a split's records: a Hugging Face `save_to_disk` folder (state.json + Arrow files,
    read with pyarrow), a `.json` array or a `.jsonl` file (`load_records`, `read_arrow`,
    `parse_json_records`), and checking their fields (`_field`, `_text`);
  - holding out a seeded validation slice (`hold_out`) and writing train/valid/test JSONL (`write`);
  - the options every prepare.py takes (`arguments`: --source, --out, --valid-fraction, --seed) and
    `PrepareError`, the one-line error every prepare.py reports with exit status 2.
What a record means (fields, prompts, demonstrations) stays in each recipe's prepare.py.
"""

from __future__ import annotations

import argparse
import json
import random
import urllib.error
import urllib.request
from pathlib import Path

OFFICIAL = "github:idanshen/Self-Distillation@d77573212fa0a3ae2eeb64b9b44db1c251f75e3e"
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class PrepareError(Exception):
    """Bad input: reported as one line, exit status 2."""


class NotFound(PrepareError):
    pass


def arguments(
    argv: list[str] | None,
    doc: str,
    out: Path,
    *,
    source_help: str,
    valid_fraction: float,
    valid_help: str,
    seed_help: str,
) -> argparse.Namespace:
    """A prepare.py's options (the help texts are the recipe's); a --valid-fraction outside [0, 1)
    raises PrepareError. `out` is the recipe's default output folder, recipes/<recipe>/data."""
    parser = argparse.ArgumentParser(prog="prepare.py", description=doc.split("\n\n")[0])
    parser.add_argument("--source", default=OFFICIAL, help=f"{source_help} [default: {OFFICIAL}]")
    parser.add_argument(
        "--out",
        default=str(out),
        help=f"output folder [default: {out.relative_to(out.parents[2]).as_posix()}]",
    )
    parser.add_argument("--valid-fraction", type=float, default=valid_fraction, help=valid_help)
    parser.add_argument("--seed", type=int, default=42, help=seed_help)
    args = parser.parse_args(argv)
    if not 0 <= args.valid_fraction < 1:
        raise PrepareError(f"--valid-fraction: must be in [0, 1), got {args.valid_fraction}")
    return args


# ---- reading: local folders, URLs, GitHub ----------------------------------------------------


def fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-sdft-recipes"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise NotFound(f"{url}: not found (HTTP 404)") from None
        raise PrepareError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise PrepareError(
            f"{url}: cannot download ({reason}); pass --source with a local copy"
        ) from None


class Local:
    def __init__(self, root: Path):
        self.root = root

    def read(self, rel: str) -> bytes | None:
        path = self.root / rel
        return path.read_bytes() if path.is_file() else None

    def __str__(self) -> str:
        return str(self.root)


class Remote:
    def __init__(self, base: str, lfs_base: str | None = None):
        self.base, self.lfs_base = base.rstrip("/"), lfs_base

    def read(self, rel: str) -> bytes | None:
        print(f"fetching {self.base}/{rel}", flush=True)
        try:
            data = fetch(f"{self.base}/{rel}")
        except NotFound:
            return None
        if data.startswith(LFS_POINTER):  # a Git LFS file: GitHub serves its content elsewhere
            if self.lfs_base is None:
                raise PrepareError(
                    f"{self.base}/{rel}: is a Git LFS pointer, not the file; download it with git lfs"
                )
            data = fetch(f"{self.lfs_base}/{rel}")
        return data

    def __str__(self) -> str:
        return self.base


def location(source: str, subdir: str, files: bool = False) -> Local | Remote | Path:
    """Where the official folder layout is: github:OWNER/REPO[@REF] (its `subdir`), a URL, or a local
    folder (a clone, or its `subdir`). With `files`, a local file is allowed too and returned as its
    Path (science's benchmark .jsonl); without, only folders are (tooluse)."""
    if source.startswith("github:"):
        repo, _, ref = source.removeprefix("github:").partition("@")
        if repo.count("/") != 1:
            raise PrepareError(f"--source {source!r}: expected github:OWNER/REPO[@REF]")
        ref = ref or "main"
        return Remote(
            f"https://raw.githubusercontent.com/{repo}/{ref}/{subdir}",
            f"https://media.githubusercontent.com/media/{repo}/{ref}/{subdir}",
        )
    if source.startswith(("http://", "https://")):
        return Remote(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise PrepareError(
            f"--source {source!r}: no such {'file or folder' if files else 'folder'}"
        )
    if files and path.is_file():
        return path
    if (path / subdir).is_dir():
        path = path / subdir
    if not path.is_dir():
        raise PrepareError(
            f"--source {source!r}: expected a folder holding train_data and eval_data"
        )
    return Local(path)


def read_arrow(data: bytes, where: str) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise PrepareError(
            f"{where}: reading the official Arrow files needs pyarrow: pip install pyarrow"
        ) from None
    buffer = pa.py_buffer(data)
    try:  # datasets writes the IPC stream format; accept the file format too
        table = pa.ipc.open_stream(buffer).read_all()
    except pa.ArrowInvalid:
        try:
            table = pa.ipc.open_file(buffer).read_all()
        except pa.ArrowInvalid as e:
            raise PrepareError(f"{where}: not an Arrow file ({e})") from None
    return table.to_pylist()


def parse_json_records(data: bytes, where: str, jsonl: bool) -> list[tuple[str, dict]]:
    text = data.decode("utf-8-sig")
    if jsonl:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{where}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{where}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(value, list):
            raise PrepareError(f"{where}: expected a JSON array of records")
        rows = [(f"{where}[{i}]", row) for i, row in enumerate(value)]
    for row_where, row in rows:
        if not isinstance(row, dict):
            raise PrepareError(f"{row_where}: a record must be a JSON object")
    return rows


def load_records(loc: Local | Remote, name: str) -> list[tuple[str, dict]]:
    """(where, record) pairs of `name` (train_data / eval_data): a save_to_disk folder, .json or .jsonl."""
    state = loc.read(f"{name}/state.json")
    if state is not None:
        try:
            files = [entry["filename"] for entry in json.loads(state)["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise PrepareError(
                f"{loc}/{name}/state.json: no _data_files list of {{filename}}"
            ) from None
        rows: list[tuple[str, dict]] = []
        for filename in files:
            where = f"{loc}/{name}/{filename}"
            data = loc.read(f"{name}/{filename}")
            if data is None:
                raise PrepareError(f"{where}: listed in state.json but missing")
            rows += [
                (f"{name}[{len(rows) + i}]", row) for i, row in enumerate(read_arrow(data, where))
            ]
        return rows
    for ext in ("json", "jsonl"):
        data = loc.read(f"{name}.{ext}")
        if data is not None:
            return parse_json_records(data, f"{loc}/{name}.{ext}", jsonl=ext == "jsonl")
    raise PrepareError(
        f"{loc}: has no {name}/ (a datasets folder with state.json), {name}.json or {name}.jsonl"
    )


# ---- checking fields, splitting --------------------------------------------------------------


def _field(record: dict, key: str, where: str):
    if key not in record or record[key] is None:
        raise PrepareError(f'{where}: "{key}" is missing')
    return record[key]


def _text(record: dict, key: str, where: str) -> str:
    value = _field(record, key, where)
    if not isinstance(value, str) or not value.strip():
        raise PrepareError(f'{where}: "{key}" must be a non-empty string')
    return value


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random `fraction` of the rows, the rest in their order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(len(rows) * fraction)])
    return [r for i, r in enumerate(rows) if i not in held], [
        r for i, r in enumerate(rows) if i in held
    ]


# ---- writing ---------------------------------------------------------------------------------


def write(splits: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        if not rows:
            path.unlink(missing_ok=True)  # a stale split from an earlier run would be read as data
            continue
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
        )
        tmp.replace(path)
    try:  # the same check `mlx-sdft train` makes, when mlx-sdft is installed
        from mlx_sdft.core.data import load_examples
        from mlx_sdft.errors import InputError
    except ImportError:
        return
    for split, rows in splits.items():
        if rows:
            try:
                load_examples(out / f"{split}.jsonl")
            except InputError as e:
                raise PrepareError(str(e)) from None
