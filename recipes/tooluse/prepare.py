#!/usr/bin/env python3
"""Fetch the paper's ToolAlpaca data (the official SDFT release) and write mlx-sdft JSONL.

    python recipes/tooluse/prepare.py [--source SOURCE] [--out recipes/tooluse/data]

SOURCE (default: the official repository at a pinned commit, see README.md):
  github:OWNER/REPO[@REF]   raw files of data/tooluse_data/ in that GitHub repository
  https://...               a URL of a folder laid out like data/tooluse_data/
  PATH                      a local copy: a clone of the repository, or its data/tooluse_data/

The folder holds `train_data` and `eval_data`, each a `datasets.save_to_disk` folder
(state.json + .arrow files; reading them needs `pip install pyarrow`) or a `.json` array /
`.jsonl` file of the same records. Fields used (as the official `main.py` and
`eval_tooluse.py` use them):
  train_data: prompt (str), golden_response (list of str); golden_answer (optional, checked)
  eval_data:  prompt (str), golden_answer (list of {Action, Action_Input}, or the columnar
              {Action: [...], Action_Input: [...]} that train_data's Arrow schema uses)

Each record becomes one line {"messages": [user, assistant]}:
  train.jsonl / valid.jsonl  user = prompt, assistant = "\\n".join(golden_response), the
                             demonstration exactly as the official code builds it; valid.jsonl
                             is a seeded held-out slice of train_data (--valid-fraction).
  test.jsonl                 user = prompt, assistant = the gold actions written by
                             metric.render_gold; for `mlx-sdft eval --metric recipes.tooluse.metric:score`
                             only (never train on it).
A missing or malformed field stops the run with one line naming the record and the field.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFICIAL = "github:idanshen/Self-Distillation@d77573212fa0a3ae2eeb64b9b44db1c251f75e3e"
SUBDIR = "data/tooluse_data"
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class PrepareError(Exception):
    """Bad input: reported as one line, exit status 2."""


class NotFound(PrepareError):
    pass


def _metric():
    spec = importlib.util.spec_from_file_location("tooluse_metric", HERE / "metric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        raise PrepareError(f"{url}: cannot download ({reason}); pass --source with a local copy") from None


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
                raise PrepareError(f"{self.base}/{rel}: is a Git LFS pointer, not the file; download it with git lfs")
            data = fetch(f"{self.lfs_base}/{rel}")
        return data

    def __str__(self) -> str:
        return self.base


def location(source: str) -> Local | Remote:
    if source.startswith("github:"):
        repo, _, ref = source.removeprefix("github:").partition("@")
        if repo.count("/") != 1:
            raise PrepareError(f"--source {source!r}: expected github:OWNER/REPO[@REF]")
        ref = ref or "main"
        return Remote(f"https://raw.githubusercontent.com/{repo}/{ref}/{SUBDIR}",
                      f"https://media.githubusercontent.com/media/{repo}/{ref}/{SUBDIR}")
    if source.startswith(("http://", "https://")):
        return Remote(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise PrepareError(f"--source {source!r}: no such folder")
    if (path / SUBDIR).is_dir():
        path = path / SUBDIR
    if not path.is_dir():
        raise PrepareError(f"--source {source!r}: expected a folder holding train_data and eval_data")
    return Local(path)


def read_arrow(data: bytes, where: str) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise PrepareError(f"{where}: reading the official Arrow files needs pyarrow: pip install pyarrow") from None
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
            raise PrepareError(f"{loc}/{name}/state.json: no _data_files list of {{filename}}") from None
        rows: list[tuple[str, dict]] = []
        for filename in files:
            where = f"{loc}/{name}/{filename}"
            data = loc.read(f"{name}/{filename}")
            if data is None:
                raise PrepareError(f"{where}: listed in state.json but missing")
            rows += [(f"{name}[{len(rows) + i}]", row) for i, row in enumerate(read_arrow(data, where))]
        return rows
    for ext in ("json", "jsonl"):
        data = loc.read(f"{name}.{ext}")
        if data is not None:
            return parse_json_records(data, f"{loc}/{name}.{ext}", jsonl=ext == "jsonl")
    raise PrepareError(f"{loc}: has no {name}/ (a datasets folder with state.json), {name}.json or {name}.jsonl")


# ---- converting ------------------------------------------------------------------------------


def _field(record: dict, key: str, where: str):
    if key not in record or record[key] is None:
        raise PrepareError(f'{where}: "{key}" is missing')
    return record[key]


def _text(record: dict, key: str, where: str) -> str:
    value = _field(record, key, where)
    if not isinstance(value, str) or not value.strip():
        raise PrepareError(f'{where}: "{key}" must be a non-empty string')
    return value


def demonstration(record: dict, where: str) -> str:
    """golden_response joined with "\\n", as the official main.py builds the teacher's example."""
    lines = _field(record, "golden_response", where)
    if isinstance(lines, str):
        lines = [lines]
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise PrepareError(f'{where}: "golden_response" must be a list of strings')
    demo = "\n".join(lines)
    if not demo.strip():
        raise PrepareError(f'{where}: "golden_response" is empty')
    return demo


def golden_pairs(record: dict, where: str, required: bool = True) -> list[tuple[str, str]]:
    """golden_answer as (Action, Action_Input) pairs; a list of dicts or the columnar dict of lists.
    Not `required` (train_data, where only the consistency note uses it): absent or empty gives []."""
    if not required and record.get("golden_answer") is None:
        return []
    gold = _field(record, "golden_answer", where)
    if isinstance(gold, dict):
        names, inputs = gold.get("Action"), gold.get("Action_Input")
        for key, value in (("Action", names), ("Action_Input", inputs)):
            if not isinstance(value, list):
                raise PrepareError(f'{where}: "golden_answer.{key}" must be a list')
        if len(names) != len(inputs):
            raise PrepareError(f'{where}: "golden_answer.Action" and "golden_answer.Action_Input" differ in length')
        items = [{"Action": n, "Action_Input": i} for n, i in zip(names, inputs)]
    elif isinstance(gold, list):
        items = gold
    else:
        raise PrepareError(f'{where}: "golden_answer" must be a list of {{Action, Action_Input}}')
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PrepareError(f'{where}: "golden_answer[{i}]" must be an object with Action and Action_Input')
        name, args = item.get("Action"), item.get("Action_Input")
        if not isinstance(name, str) or not name.strip():
            raise PrepareError(f'{where}: "golden_answer[{i}].Action" must be a non-empty string')
        if not isinstance(args, str):
            raise PrepareError(f'{where}: "golden_answer[{i}].Action_Input" must be a string')
        pairs.append((name, args))
    if not pairs and required:
        raise PrepareError(f'{where}: "golden_answer" has no actions')
    return pairs


def line(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def convert(train: list[tuple[str, dict]], evaluation: list[tuple[str, dict]], valid_fraction: float,
            seed: int) -> tuple[dict[str, list[dict]], int]:
    """{split: lines} and the number of demonstrations whose actions disagree with their golden_answer."""
    metric = _metric()
    lines, disagree = [], 0
    for where, record in train:
        demo = demonstration(record, where)
        lines.append(line(_text(record, "prompt", where), demo))
        pairs = golden_pairs(record, where, required=False)
        if pairs:
            gold, parsed = metric.gold_from_answer(pairs), metric.reference_gold(demo)
            disagree += sorted(parsed[0]) != sorted(gold[0]) or parsed[1] != gold[1]
    if not lines:
        raise PrepareError("train_data has no records")
    test = [line(_text(r, "prompt", w), metric.render_gold(golden_pairs(r, w))) for w, r in evaluation]
    kept, held = hold_out(lines, valid_fraction, seed)
    return {"train": kept, "valid": held, "test": test}, disagree


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random `fraction` of the rows, the rest in their order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(len(rows) * fraction)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---- writing ---------------------------------------------------------------------------------


def write(splits: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        if not rows:
            path.unlink(missing_ok=True)  # a stale split from an earlier run would be read as data
            continue
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(path)
    try:  # the same check `mlx-sdft train` makes, when mlx-sdft is installed
        from mlx_sdft.data import load_examples
        from mlx_sdft.errors import InputError
    except ImportError:
        return
    for split, rows in splits.items():
        if rows:
            try:
                load_examples(out / f"{split}.jsonl")
            except InputError as e:
                raise PrepareError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=OFFICIAL,
                        help=f"github:OWNER/REPO[@REF], a URL or a local folder [default: {OFFICIAL}]")
    parser.add_argument("--out", default=str(HERE / "data"), help="output folder [default: recipes/tooluse/data]")
    parser.add_argument("--valid-fraction", type=float, default=0.05,
                        help="share of train_data held out as valid.jsonl [default: 0.05]")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the held-out slice [default: 42, the official code's]")
    args = parser.parse_args(argv)
    try:
        if not 0 <= args.valid_fraction < 1:
            raise PrepareError(f"--valid-fraction: must be in [0, 1), got {args.valid_fraction}")
        loc = location(args.source)
        train, evaluation = load_records(loc, "train_data"), load_records(loc, "eval_data")
        splits, disagree = convert(train, evaluation, args.valid_fraction, args.seed)
        write(splits, Path(args.out))
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s}.jsonl {len(rows)}" for s, rows in splits.items() if rows)
    print(f"read {len(train)} train_data and {len(evaluation)} eval_data records from {loc}")
    print(f"wrote {args.out}: {counts}")
    if disagree:
        print(f"note: {disagree} demonstration(s) do not show the actions/arguments of their golden_answer "
              f"(valid.jsonl is scored against the demonstration; test.jsonl against golden_answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
