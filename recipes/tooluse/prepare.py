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

This file owns the ToolAlpaca fields and the lines built from them; fetching the release, reading
its records, the held-out slice and writing the JSONL are recipes/official_data.py's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(
    0, str(HERE.parent)
)  # recipes/, for official_data.py: the reading and writing shared with science
import official_data  # noqa: E402,F401  (Remote calls official_data.fetch: patch it there, not here)
from official_data import (  # noqa: E402,F401  (Local, NotFound, fetch: still importable from here)
    Local,
    NotFound,
    OFFICIAL,
    PrepareError,
    _field,
    _text,
    arguments,
    fetch,
    hold_out,
    load_records,
    location,
    write,
)

SUBDIR = "data/tooluse_data"


def _metric():
    spec = importlib.util.spec_from_file_location("tooluse_metric", HERE / "metric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- converting ------------------------------------------------------------------------------


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
            raise PrepareError(
                f'{where}: "golden_answer.Action" and "golden_answer.Action_Input" differ in length'
            )
        items = [{"Action": n, "Action_Input": i} for n, i in zip(names, inputs)]
    elif isinstance(gold, list):
        items = gold
    else:
        raise PrepareError(f'{where}: "golden_answer" must be a list of {{Action, Action_Input}}')
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PrepareError(
                f'{where}: "golden_answer[{i}]" must be an object with Action and Action_Input'
            )
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
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    }


def convert(
    train: list[tuple[str, dict]],
    evaluation: list[tuple[str, dict]],
    valid_fraction: float,
    seed: int,
) -> tuple[dict[str, list[dict]], int]:
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
    test = [
        line(_text(r, "prompt", w), metric.render_gold(golden_pairs(r, w))) for w, r in evaluation
    ]
    kept, held = hold_out(lines, valid_fraction, seed)
    return {"train": kept, "valid": held, "test": test}, disagree


def main(argv: list[str] | None = None) -> int:
    try:
        args = arguments(
            argv,
            __doc__,
            HERE / "data",
            source_help="github:OWNER/REPO[@REF], a URL or a local folder",
            valid_fraction=0.05,
            valid_help="share of train_data held out as valid.jsonl [default: 0.05]",
            seed_help="seed of the held-out slice [default: 42, the official code's]",
        )
        loc = location(args.source, SUBDIR)
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
        print(
            f"note: {disagree} demonstration(s) do not show the actions/arguments of their golden_answer "
            f"(valid.jsonl is scored against the demonstration; test.jsonl against golden_answer)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
