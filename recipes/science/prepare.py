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

This file owns the SciKnowEval fields, the hub download and the lines built from them; fetching
the release, reading its records, the held-out slices and writing the JSONL are
recipes/official_data.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(
    0, str(HERE.parent)
)  # recipes/, for official_data.py: the reading and writing shared with tooluse
import official_data  # noqa: E402,F401  (Remote calls official_data.fetch: patch it there, not here)
from official_data import (  # noqa: E402,F401  (Local, NotFound, fetch: still importable from here)
    Local,
    NotFound,
    OFFICIAL,
    PrepareError,
    Remote,
    _field,
    _text,
    arguments,
    fetch,
    hold_out,
    load_records,
    parse_json_records,
    write,
)

SUBDIR = "data/science_data"
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


# ---- reading: the Hugging Face hub (the official release: official_data.py) --------------------


def location(source: str) -> Local | Remote | Path:
    """Where the official folder layout is (Local/Remote), or the path of a benchmark .jsonl file."""
    if source == "hf" or source.startswith("hf:"):
        return hf_download(source.removeprefix("hf").removeprefix(":") or HF_REPO)
    return official_data.location(source, SUBDIR, files=True)


def hf_download(spec: str) -> Path:
    """The benchmark's Chemistry file from the hub (cached by huggingface_hub)."""
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1:
        raise PrepareError(f"--source hf:{spec}: expected hf:OWNER/NAME[@REVISION]")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise PrepareError(
            "--source hf needs huggingface_hub: pip install huggingface-hub"
        ) from None
    revision = revision or (HF_REVISION if repo == HF_REPO else None)
    try:
        return Path(
            hf_hub_download(repo_id=repo, filename=HF_FILE, repo_type="dataset", revision=revision)
        )
    except Exception as e:  # network, missing file, gated repo: one line either way
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise PrepareError(
            f"hf:{repo}@{revision or 'main'} {HF_FILE}: cannot download ({why})"
        ) from None


# ---- converting ------------------------------------------------------------------------------


def messages(record: dict, key: str, where: str) -> list[dict]:
    """A list of {role, content} ending with a user message (a string is one user message)."""
    value = _field(record, key, where)
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PrepareError(f'{where}: "{key}" must be a non-empty list of messages')
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(k), str) for k in ("role", "content")
        ):
            raise PrepareError(
                f'{where}: "{key}[{i}]" must be an object with string "role" and "content"'
            )
    if value[-1]["role"] != "user":
        raise PrepareError(
            f'{where}: "{key}[{len(value) - 1}].role" must be "user" (the question comes last)'
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def answer_line(prompt: list[dict], answer: str) -> dict:
    return {"messages": [*prompt, {"role": "assistant", "content": answer}]}


def convert_official(
    train: list[tuple[str, dict]],
    evaluation: list[tuple[str, dict]],
    valid_fraction: float,
    seed: int,
) -> tuple[dict[str, list[dict]], int]:
    """{split: lines}, and how many demonstrations have no <answer>...</answer> to score valid.jsonl by."""
    lines, unscorable = [], 0
    for where, record in train:
        demo = _text(record, "output_text", where)
        lines.append(answer_line(messages(record, "messages", where), demo))
        unscorable += "<answer>" not in demo
    if not lines:
        raise PrepareError("train_data has no records")
    test = [
        answer_line(messages(r, "prompt", w), f"<answer>{_text(r, 'answer', w).strip()}</answer>")
        for w, r in evaluation
    ]
    kept, held = hold_out(lines, valid_fraction, seed)
    return {"train": kept, "valid": held, "test": test}, unscorable


def _level(record: dict, where: str) -> str:
    details = _field(record, "details", where)
    if not isinstance(details, dict) or not isinstance(details.get("level"), str):
        raise PrepareError(f'{where}: "details.level" is missing (expected e.g. "L3")')
    return details["level"].strip().upper()


def benchmark_question(record: dict, where: str) -> tuple[list[dict], str] | None:
    """(prompt messages, gold letter) of a Chemistry L3 multiple-choice record, else None."""
    if (
        str(record.get("domain", "Chemistry")).strip().lower() != "chemistry"
        or _level(record, where) != "L3"
    ):
        return None
    if not str(record.get("type", "mcq")).startswith("mcq"):
        return None
    question = _text(record, "question", where)
    choices = _field(record, "choices", where)
    texts = choices.get("text") if isinstance(choices, dict) else None
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise PrepareError(f'{where}: "choices.text" must be a non-empty list of strings')
    if (
        not isinstance(labels, list)
        or len(labels) != len(texts)
        or not all(isinstance(x, str) for x in labels)
    ):
        raise PrepareError(
            f'{where}: "choices.label" must be a list of strings, one per choices.text'
        )
    key = _text(record, "answerKey", where).strip()
    if key not in labels:
        raise PrepareError(f'{where}: "answerKey" {key!r} is not one of choices.label {labels}')
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
    prompt = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{question}\n\n{options}"},
    ]
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


def main(argv: list[str] | None = None) -> int:
    try:
        args = arguments(
            argv,
            __doc__,
            HERE / "data",
            source_help="github:OWNER/REPO[@REF], a URL, a local folder or .jsonl file, or "
            "hf[:OWNER/NAME[@REV]]",
            valid_fraction=0.0625,
            valid_help="share of train_data held out as valid.jsonl "
            "[default: 1/16]; the benchmark path always splits 75/5/20",
            seed_help="seed of the held-out slices [default: 42, the official code's]",
        )
        loc = location(args.source)
        if isinstance(loc, Path):
            records = parse_json_records(loc.read_bytes(), str(loc), jsonl=loc.suffix != ".json")
            splits, note = convert_benchmark(records, args.seed), None
            read = f"read {len(records)} benchmark records from {loc}"
        else:
            train, evaluation = load_records(loc, "train_data"), load_records(loc, "eval_data")
            splits, unscorable = convert_official(train, evaluation, args.valid_fraction, args.seed)
            read = (
                f"read {len(train)} train_data and {len(evaluation)} eval_data records from {loc}"
            )
            note = (
                (
                    f"note: {unscorable} demonstration(s) have no <answer>...</answer>; as valid.jsonl "
                    f"references they score 0"
                )
                if unscorable
                else None
            )
        write(splits, Path(args.out))
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    print(read)
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{s}.jsonl {len(rows)}" for s, rows in splits.items() if rows)
    )
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
