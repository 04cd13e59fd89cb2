"""`mlx-sdft export`: the adapted model where other tools read it.

- gguf: adapters fused into the weights, one .gguf file for llama.cpp / Ollama / LM Studio, and an
  Ollama Modelfile beside it (formats/gguf_write, formats/ollama);
- peft: the adapters as a Hugging Face PEFT folder (formats/peft);
- mlx: an mlx-lm model folder, the adapters fused in (or, for a .gguf without adapters, the file
  as it is: formats/gguf_read.gguf_to_mlx).

Every output is written under a temporary name and renamed into place, so a failed export
leaves nothing half-written; an existing output is replaced only with --force.
"""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.nn as nn

from mlx_sdft.config import ExportConfig, check_model
from mlx_sdft.errors import InputError
from mlx_sdft.formats.models import Adapters, load_tokenizer, open_model, package_file, resolve


def run_export(cfg: ExportConfig) -> dict:
    """Write what `cfg` asks for; returns {"format", "out", "modelfile" (gguf only)}.

    Raises InputError (before any weights load where it can) for an existing --out without
    --force, a missing or foreign adapter folder, and what the format cannot express."""
    cfg, served = _from_home(cfg) if cfg.home else (cfg, None)
    out = Path(cfg.out).expanduser()
    fmt = cfg.format or ("gguf" if out.suffix == ".gguf" else "mlx")
    modelfile = out.parent / "Modelfile" if fmt == "gguf" else None
    for flag, given in (("--model", cfg.model), ("--adapter-path", cfg.adapter_path)):
        if given and not given.startswith("pkg:") and _overlaps(Path(given).expanduser(), out):
            raise InputError(f"--out {out}: would overwrite {flag} {given}")
    _check_out(out, folder=fmt != "gguf", force=cfg.force, marker=_MARKER[fmt])
    if modelfile is not None:
        _check_out(modelfile, folder=False, force=cfg.force)
    adapter = Adapters.saved(cfg.adapter_path) if cfg.adapter_path else None
    if fmt == "peft" and served is not None and not served["version"]:
        raise InputError(
            f"--format peft: --home {cfg.home} has no learned version (its current version is 0, the "
            "base model alone), so there are no adapters to convert; export the base model with "
            "--format gguf, or run mlx-sdft learn first"
        )
    if fmt == "peft" and (adapter is None or adapter.fine_tune_type == "full"):
        raise InputError(
            "--format peft: needs LoRA or DoRA adapters (--adapter-path of a lora/dora run); "
            "a full fine-tune goes out with --format gguf or mlx"
        )
    if served is not None:
        check_model(cfg.model)  # the default model, when the home names none
    source = (
        package_file(cfg.model) if cfg.model.startswith("pkg:") else Path(cfg.model).expanduser()
    )
    source = source if source.suffix == ".gguf" else None
    if fmt == "mlx" and adapter is None:
        if source is None:
            raise InputError(
                "--adapter-path: required to export a model folder or hub model as mlx (it already is one)"
            )
        from mlx_sdft.formats.gguf_read import gguf_to_mlx

        _replace((out,), lambda tmp: gguf_to_mlx(source, tmp, cfg.dequantize))
        return {"format": fmt, "out": out}

    model_path = resolve(cfg.model, cfg.dequantize)
    if fmt == "gguf":
        from mlx_sdft.formats.gguf_write import architecture

        architecture(
            json.loads((model_path / "config.json").read_text()), cfg.model
        )  # before the weights load
        if (
            source is None
        ):  # a tokenizer llama.cpp would split text with differently: refused before the weights load
            from mlx_sdft.formats.gguf_vocab import check_tokenizer

            check_tokenizer(load_tokenizer(model_path)._tokenizer)
    model, _ = open_model(model_path, adapters=cfg.adapter_path)
    if fmt == "peft":
        from mlx_sdft.formats.peft import write_peft

        dropout = float(adapter.lora_parameters.get("dropout", 0.0))
        _replace((out,), lambda tmp: write_peft(model, tmp, cfg.model, dropout))
        return {"format": fmt, "out": out}

    from mlx_sdft.formats.fuse import fuse_adapters

    model, tokenizer = fuse_adapters(model), load_tokenizer(model_path)
    if fmt == "mlx":
        _replace((out,), lambda tmp: _save_mlx(model, tokenizer, model_path, tmp))
        return {"format": fmt, "out": out}
    from mlx_sdft.formats.gguf_write import write_gguf
    from mlx_sdft.formats.ollama import modelfile as modelfile_text

    name = source.stem if source else Path(cfg.model).name
    if served:  # general.name says what it is: the base and the personal version
        name = f"{name} + mlx-sdft version {served['version']}"

    def write(tmp: Path, tmp_modelfile: Path) -> None:
        vocab = write_gguf(model, tokenizer, tmp, cfg.outtype, source, name)
        stops = [vocab["tokens"][i] for i in vocab["end_ids"]]
        rendered = _rendered(tokenizer, served["rules"] if served else None)
        tmp_modelfile.write_text(modelfile_text(out.name, vocab["chat_template"], stops, rendered))

    _replace(
        (out, modelfile), write
    )  # both or neither: a GGUF without its Modelfile would block a rerun
    return {"format": fmt, "out": out, "modelfile": modelfile}


def _rendered(tokenizer, rules: str | None = None) -> str | None:
    """The chat template applied to one user message (to find a system prompt it adds by itself),
    with `rules` added to that system prompt as `serve` adds them."""
    from mlx_sdft.core.prompts import template_system_prompt, with_rules

    try:
        messages = with_rules(
            [{"role": "user", "content": "hi"}], rules, template_system_prompt(tokenizer)
        )
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except (
        Exception
    ):  # no chat template, or one that wants other roles: the Modelfile goes without SYSTEM
        return None


def _from_home(cfg: ExportConfig) -> tuple[ExportConfig, dict]:
    """The options that export what `serve --home` answers with, and {"version", "rules"}."""
    from mlx_sdft.store import rules, versions
    from mlx_sdft.store.db import Store

    with Store(cfg.home, create=False) as store:
        home = store.home
        exchanges, standing = (
            [e["model"] for e in store.exchanges(1)],
            store.lessons(None, standing=True),
        )
    now = versions.current(home)
    record = (
        versions.verify(home, now) if now else None
    )  # the files served, checked against their sha256
    model = (
        cfg.model
        if "model" in getattr(cfg, "given", ())
        else versions.model_of(home, exchanges) or cfg.model
    )
    shown = rules.in_prompt(standing, cfg.rules_in_prompt, record)
    for (
        row
    ) in shown:  # stored before the check existed, or by hand: SYSTEM """...""" would end early
        rules.check_text(row["text"], f"{row['kind']} {row['id']}")
    options = dataclasses.replace(
        cfg, model=model, adapter_path=str(versions.version_dir(home, now)) if now else None
    )
    return options, {"version": now, "rules": rules.rulebook(shown)}


def _save_mlx(model: nn.Module, tokenizer, model_path: Path, folder: Path) -> None:
    from mlx_lm.utils import save_config, save_model

    config = json.loads((model_path / "config.json").read_text())
    config.pop("quantization", None)  # fuse_adapters dequantized every layer
    config.pop("quantization_config", None)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    tokenizer.save_pretrained(folder)


def _replace(targets: tuple[Path, ...], write: Callable[..., object]):
    """`write(*tmps)` to temporary names beside `targets`, then put each in its target's place
    (the renames only once every file is whole)."""
    tmps = [t.with_name(f".{t.name}.tmp-{os.getpid()}") for t in targets]
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    for target in (
        targets
    ):  # this run's temporaries, and those of an export killed outright (kill -9, power loss)
        for tmp in target.parent.glob(f".{target.name}.tmp-*"):
            if not _alive(tmp.name.rsplit("-", 1)[-1]):
                _remove(tmp)
    try:
        result = write(*tmps)
    except BaseException:
        for tmp in tmps:
            _remove(tmp)
        raise
    for tmp, target in zip(tmps, targets):
        _remove(target)
        os.replace(tmp, target)
    return result


# A folder --force may replace holds what an earlier export of that format wrote (or nothing), so
# a mistyped --out (the home folder, a project) is never deleted.
_MARKER = {
    "gguf": None,
    "mlx": "config.json",
    "peft": "adapter_model.safetensors",
}  # not mlx-lm's adapters.safetensors


def _check_out(target: Path, *, folder: bool, force: bool, marker: str | None = None) -> None:
    """InputError, before any weights load, for an output that cannot or may not be written:
    an existing one without --force, a file where a folder goes (or the other way round), a folder
    that is not an earlier export, or a location that is not a writable folder."""
    if target.exists() or target.is_symlink():
        if not force:
            raise InputError(f"{target}: already exists (--force replaces it)")
        if target.is_dir() != folder:
            raise InputError(
                f"{target}: is a {'folder' if target.is_dir() else 'file'}; the output is a "
                f"{'folder' if folder else 'file'}"
            )
        if folder and any(target.iterdir()) and not (target / marker).is_file():
            raise InputError(
                f"{target}: not an earlier export (no {marker}); --force replaces only those"
            )
    parent = target.parent
    while (
        not parent.exists()
    ):  # the folders export will create: the first that exists must be writable
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{target}: cannot be written ({parent} is not a writable folder)")


def _alive(pid: str) -> bool:
    """Whether process `pid` (another export writing there now) still runs; this one counts as ended."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours
        return True
    return True


def _overlaps(given: Path, out: Path) -> bool:
    """`out` is the existing input `given` or a folder holding it (replacing it would delete the input)."""
    if not given.exists():
        return False
    given, out = given.resolve(), out.resolve()
    return given == out or out in given.parents


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
