#!/usr/bin/env python3
"""Fetch the paper's SciKnowEval Chemistry L-3 data and write mlx-sdft JSONL.

    python recipes/science/prepare.py [--source SOURCE] [--out recipes/science/data]

SOURCE (default: the official SDFT repository at a pinned commit, see README.md):
  github:OWNER/REPO[@REF]   raw files of data/science_data/ in that GitHub repository
  https://...               a URL of a folder laid out like data/science_data/
  PATH (a folder)           a local copy: a clone of the repository, or its data/science_data/
  hf[:OWNER/NAME[@REV]]     the original benchmark on the Hugging Face hub (hicai-zju/SciKnowEval),
                            through huggingface_hub; see "The benchmark itself" below
  PATH (a .jsonl file)      a local copy of the benchmark's Chemistry file (or a .json array)

The paper's data (the official release): `train_data` and `eval_data`, each a
`datasets.save_to_disk` folder (state.json + .arrow files; reading them needs
`pip install pyarrow`) or a `.json` array / `.jsonl` file of the same records:
  train_data: messages (system + user messages), output_text (the GPT-4o demonstration)
  eval_data:  prompt (system + user messages), answer (the gold letter)
Each record becomes one line {"messages": [...]}:
  train.jsonl / valid.jsonl  messages + assistant output_text: the student prompt and the
                             demonstration exactly as the official main.py uses them (the system
                             message stays); valid.jsonl is a seeded held-out slice of train_data
                             (--valid-fraction, default 1/16: the paper's 75/5 train/val ratio).
  test.jsonl                 prompt + assistant "<answer>X</answer>" (the gold letter), for
                             `mlx-sdft eval --metric recipes.science.metric:score` only.

The benchmark itself (hf, or a .jsonl file): the Chemistry file of SciKnowEval, filtered to
level L3 multiple-choice questions, split 75/5/20 (seeded) into train/valid/test. It has no
demonstrations: each one is the bare gold answer "<answer>X</answer>" (answer-only, not the
paper's GPT-4o responses), and the system prompt is this recipe's own (SYSTEM_PROMPT).

A missing or malformed field stops the run with one line naming the record and the field.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFICIAL = "github:idanshen/Self-Distillation@d77573212fa0a3ae2eeb64b9b44db1c251f75e3e"
SUBDIR = "data/science_data"
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# The benchmark on the hub, pinned to the revision that was its main branch when this recipe
# was written (a public copy of the SDFT eval data records the same revision).
HF_REPO, HF_REVISION = "hicai-zju/SciKnowEval", "3284f6fbf3b8063ab8a0408a65fb00157dbdc9fa"
HF_FILE = "data/Chemistry/sciknoweval_chemistry_test.jsonl"
# This recipe's system prompt for the benchmark path (the official one ships inside the
# released records and is used as it is there).
SYSTEM_PROMPT = (
    "Answer the multiple-choice question. Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    "Inside <answer> write only the letter of the correct option."
)


class PrepareError(Exception):
    """Bad input: reported as one line, exit status 2."""


class NotFound(PrepareError):
    pass


# ---- reading: local folders, URLs, GitHub, the Hugging Face hub --------------------------------


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


def location(source: str) -> Local | Remote | Path:
    """Where the official folder layout is (Local/Remote), or the path of a benchmark .jsonl file."""
    if source == "hf" or source.startswith("hf:"):
        return hf_download(source.removeprefix("hf").removeprefix(":") or HF_REPO)
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
        raise PrepareError(f"--source {source!r}: no such file or folder")
    if path.is_file():
        return path
    if (path / SUBDIR).is_dir():
        path = path / SUBDIR
    return Local(path)


def hf_download(spec: str) -> Path:
    """The benchmark's Chemistry file from the hub (cached by huggingface_hub)."""
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1:
        raise PrepareError(f"--source hf:{spec}: expected hf:OWNER/NAME[@REVISION]")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise PrepareError("--source hf needs huggingface_hub: pip install huggingface-hub") from None
    revision = revision or (HF_REVISION if repo == HF_REPO else None)
    try:
        return Path(hf_hub_download(repo_id=repo, filename=HF_FILE, repo_type="dataset", revision=revision))
    except Exception as e:  # network, missing file, gated repo: one line either way
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise PrepareError(f"hf:{repo}@{revision or 'main'} {HF_FILE}: cannot download ({why})") from None


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


def messages(record: dict, key: str, where: str) -> list[dict]:
    """A list of {role, content} ending with a user message (a string is one user message)."""
    value = _field(record, key, where)
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PrepareError(f'{where}: "{key}" must be a non-empty list of messages')
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise PrepareError(f'{where}: "{key}[{i}]" must be an object with string "role" and "content"')
    if value[-1]["role"] != "user":
        raise PrepareError(f'{where}: "{key}[{len(value) - 1}].role" must be "user" (the question comes last)')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def answer_line(prompt: list[dict], answer: str) -> dict:
    return {"messages": [*prompt, {"role": "assistant", "content": answer}]}


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random `fraction` of the rows, the rest in their order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(len(rows) * fraction)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def convert_official(train: list[tuple[str, dict]], evaluation: list[tuple[str, dict]], valid_fraction: float,
                     seed: int) -> tuple[dict[str, list[dict]], int]:
    """{split: lines}, and how many demonstrations have no <answer>...</answer> to score valid.jsonl by."""
    lines, unscorable = [], 0
    for where, record in train:
        demo = _text(record, "output_text", where)
        lines.append(answer_line(messages(record, "messages", where), demo))
        unscorable += "<answer>" not in demo
    if not lines:
        raise PrepareError("train_data has no records")
    test = [answer_line(messages(r, "prompt", w), f"<answer>{_text(r, 'answer', w).strip()}</answer>")
            for w, r in evaluation]
    kept, held = hold_out(lines, valid_fraction, seed)
    return {"train": kept, "valid": held, "test": test}, unscorable


def _level(record: dict, where: str) -> str:
    details = _field(record, "details", where)
    if not isinstance(details, dict) or not isinstance(details.get("level"), str):
        raise PrepareError(f'{where}: "details.level" is missing (expected e.g. "L3")')
    return details["level"].strip().upper()


def benchmark_question(record: dict, where: str) -> tuple[list[dict], str] | None:
    """(prompt messages, gold letter) of a Chemistry L3 multiple-choice record, else None."""
    if str(record.get("domain", "Chemistry")).strip().lower() != "chemistry" or _level(record, where) != "L3":
        return None
    if not str(record.get("type", "mcq")).startswith("mcq"):
        return None
    question = _text(record, "question", where)
    choices = _field(record, "choices", where)
    texts = choices.get("text") if isinstance(choices, dict) else None
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise PrepareError(f'{where}: "choices.text" must be a non-empty list of strings')
    if not isinstance(labels, list) or len(labels) != len(texts) or not all(isinstance(x, str) for x in labels):
        raise PrepareError(f'{where}: "choices.label" must be a list of strings, one per choices.text')
    key = _text(record, "answerKey", where).strip()
    if key not in labels:
        raise PrepareError(f'{where}: "answerKey" {key!r} is not one of choices.label {labels}')
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"{question}\n\n{options}"}]
    return prompt, key


def convert_benchmark(records: list[tuple[str, dict]], seed: int) -> dict[str, list[dict]]:
    """Chemistry L3 multiple-choice questions split 75/5/20 with answer-only demonstrations."""
    lines = []
    for where, record in records:
        found = benchmark_question(record, where)
        if found is not None:
            lines.append(answer_line(found[0], f"<answer>{found[1]}</answer>"))
    if not lines:
        raise PrepareError(f"no Chemistry L3 multiple-choice records among {len(records)}")
    rest, test = hold_out(lines, 0.20, seed)
    train, valid = hold_out(rest, 0.05 / 0.80, seed + 1)
    return {"train": train, "valid": valid, "test": test}


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
                        help="github:OWNER/REPO[@REF], a URL, a local folder or .jsonl file, or "
                             f"hf[:OWNER/NAME[@REV]] [default: {OFFICIAL}]")
    parser.add_argument("--out", default=str(HERE / "data"), help="output folder [default: recipes/science/data]")
    parser.add_argument("--valid-fraction", type=float, default=0.0625,
                        help="share of train_data held out as valid.jsonl [default: 1/16]; "
                             "the benchmark path always splits 75/5/20")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the held-out slices [default: 42, the official code's]")
    args = parser.parse_args(argv)
    try:
        if not 0 <= args.valid_fraction < 1:
            raise PrepareError(f"--valid-fraction: must be in [0, 1), got {args.valid_fraction}")
        loc = location(args.source)
        if isinstance(loc, Path):
            records = parse_json_records(loc.read_bytes(), str(loc), jsonl=loc.suffix != ".json")
            splits, note = convert_benchmark(records, args.seed), None
            read = f"read {len(records)} benchmark records from {loc}"
        else:
            train, evaluation = load_records(loc, "train_data"), load_records(loc, "eval_data")
            splits, unscorable = convert_official(train, evaluation, args.valid_fraction, args.seed)
            read = f"read {len(train)} train_data and {len(evaluation)} eval_data records from {loc}"
            note = (f"note: {unscorable} demonstration(s) have no <answer>...</answer>; as valid.jsonl "
                    f"references they score 0") if unscorable else None
        write(splits, Path(args.out))
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    print(read)
    print(f"wrote {args.out}: " + ", ".join(f"{s}.jsonl {len(rows)}" for s, rows in splits.items() if rows))
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
