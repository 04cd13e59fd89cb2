"""`--data` as a Hugging Face dataset, as `mlx_lm.lora` takes one: a hub id (`org/name`), a folder
written by `DatasetDict.save_to_disk`, or a folder in a hub dataset repo's layout (data files per
split). Read with the `datasets` library (`pip install 'mlx-sdft[hf]'`); every row goes through
the same checks as a .jsonl line (core/data.py makes the Examples: this module hands it rows, and
imports nothing of it), and errors read "SOURCE/SPLIT:ROW: what is wrong".

Splits: train (required), valid or validation, test; others are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from mlx_sdft.errors import InputError, one_line

SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
DATA_FILES = (".parquet", ".arrow", ".json", ".jsonl", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(data: str) -> bool:
    """`org/name` that is not a path someone meant (no leading ./ or ~, not a .jsonl file)."""
    return bool(_HUB_ID.match(data)) and not data.endswith(".jsonl")


def is_saved_dataset(folder: Path) -> bool:
    """A `save_to_disk` folder, or one holding data files (a hub repo snapshot) and none of the
    train/valid/test.jsonl of mlx-sdft's own folder layout."""
    if (folder / "dataset_dict.json").is_file():
        return True
    if any((folder / f"{split}.jsonl").exists() for split in ("train", "valid", "test")):
        return False
    return any(
        p.suffix in DATA_FILES and p.name != "dataset_infos.json"
        for p in folder.rglob("*")
        if p.is_file()
    )


def load(
    spec: str, folder: Path | None = None
) -> Iterator[tuple[str, str, Iterator[tuple[int, dict]]]]:
    """The dataset's train/valid/test splits, one at a time as (split, where its rows come from,
    its rows numbered from 1), each read by the caller before the next split is checked."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"--data {spec}: a Hugging Face dataset needs the datasets package "
            f"(pip install 'mlx-sdft[hf]')"
        ) from None
    try:
        if folder is not None and (folder / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(str(folder or spec))
    except (
        Exception
    ) as e:  # offline, unknown or gated repo, unreadable files: all stop the run the same way
        why = (
            "the datasets library cannot read this folder"
            if folder is not None
            else "no such file or folder, and the Hugging Face hub cannot be reached or has no dataset of that name"
        )
        raise InputError(one_line(f"--data {spec}: {why} ({type(e).__name__}: {e})")) from None
    splits = set()
    for name, rows in loaded.items():
        key = SPLITS.get(name)
        if key is None:
            continue
        if key in splits:
            raise InputError(f"--data {spec}: has both a valid and a validation split; keep one")
        splits.add(key)
        yield key, f"{spec}/{name}", ((i, _drop_none(row)) for i, row in enumerate(rows, 1))
    if "train" not in splits:
        raise InputError(f"--data {spec}: no train split (it has: {', '.join(loaded) or 'none'})")


def _drop_none(value: Any) -> Any:
    """Arrow gives every row every column of the dataset (null where a line had no such key); drop
    those so that a row reads like the JSON line it came from."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
