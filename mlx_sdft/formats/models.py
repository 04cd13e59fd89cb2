"""A model's files: `open_tokenizer` (hub id, folder, .gguf or pkg: file → its folder and
tokenizer), then `open_model` (the weights, with an adapter folder or new trainable adapters).
Commands open a model from their options through mlx_sdft/opening.py, which calls these two.

The tokenizer opens first and separately, so prompts can be checked before any weights load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import _download, load_config, load_model
from mlx_lm.utils import load_tokenizer as _load_tokenizer

from mlx_sdft.chat_template import stop_ids
from mlx_sdft.errors import InputError, one_line

Leaves = dict[str, mx.array]  # a model's trainable parameters by name (core.teacher's leaves)


def gguf_cache() -> Path:
    return Path(os.environ.get("MLX_SDFT_CACHE", Path.home() / ".cache" / "mlx-sdft")) / "gguf"


def resolve_gguf(path: Path, dequantize: bool | None = None) -> Path:
    """A GGUF file as an mlx-lm model folder, exported once into the cache and reused.

    Everything downstream (tokenizer first, LoRA, mlx_lm.generate --model FOLDER) then treats
    a GGUF model exactly like a hub model. The key covers the file's identity and the dtype.
    """
    from mlx_sdft.formats.gguf_read import gguf_to_mlx

    if dequantize is None:
        dequantize = (
            mx.default_device() == mx.cpu
        )  # CPU quantized matmul is ~13x slower than float32
    stat = path.stat()
    folder = (
        gguf_cache()
        / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{'f32' if dequantize else 'q'}"
    )
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(f".tmp-{os.getpid()}-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        gguf_to_mlx(path, tmp, dequantize)
        tmp.rename(folder)
    return folder


def package_file(spec: str) -> Path:
    """`pkg:PACKAGE/FILE`: a file shipped inside an installed Python package (for example a model
    that came through the package registry), found without importing the package."""
    package, _, name = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise InputError(
            f"{spec}: the package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / name
    if not path.is_file():
        raise InputError(f"{spec}: {package} has no file {name!r}")
    return path


def local_source(model: str) -> Path | None:
    """The local file or folder a model source names (None: a hub id), or the InputError `resolve`
    would raise about it, without loading, converting or downloading anything: a command checks its
    --model this way before it writes anything."""
    path = package_file(model) if model.startswith("pkg:") else Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{model}: no such GGUF file")
        return path
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{model}: not a model folder (no config.json)")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise InputError(f"{model}: no such model folder (and not a hub id like org/name)")
    return None


def resolve(model: str, dequantize: bool | None = None) -> Path:
    """A local folder as it is, a .gguf file via its exported folder, `pkg:PACKAGE/FILE` as that
    file, else a hub id (downloaded once into the HF cache)."""
    path = local_source(model)
    if path is not None:
        return resolve_gguf(path, dequantize) if path.suffix == ".gguf" else path
    try:
        return _download(model)
    except Exception as e:  # offline, unknown repo, gated: all end the run the same way
        raise InputError(
            one_line(f"{model}: could not get the model from the hub ({type(e).__name__}: {e})")
        ) from None


def load_tokenizer(model_path: Path, chat_template: str | None = None):
    """mlx-lm's tokenizer whose `eos_token_ids` is the whole stop set (`chat_template.stop_ids`): the
    tokenizer's, config.json's and generation_config.json's eos and the template's end-of-turn."""
    extra = {"chat_template": chat_template} if chat_template else None
    config = load_config(model_path)
    tokenizer = _load_tokenizer(model_path, extra, eos_token_ids=config.get("eos_token_id"))
    try:
        generation = json.loads((model_path / "generation_config.json").read_text())
    except (OSError, ValueError):
        generation = {}
    for t in stop_ids(tokenizer, config, generation if isinstance(generation, dict) else {}):
        tokenizer.add_eos_token(str(t))
    return tokenizer


def open_tokenizer(
    model: str | Path, *, chat_template: str | None = None, dequantize: bool | None = None
) -> tuple[Path, object]:
    """The model's folder (`resolve`) and its tokenizer (mlx-lm's TokenizerWrapper whose stop tokens
    are the whole stop set, see `load_tokenizer`; `chat_template` for tokenizers that lack one); no
    weights load yet. InputError for a model that cannot be found."""
    model_path = resolve(str(model), dequantize)
    return model_path, load_tokenizer(model_path, chat_template)


@dataclass(frozen=True)
class Adapters:
    """Which layers train and how (mlx_lm.lora's fine_tune_type, num_layers, lora_parameters),
    and the adapter weights to start from (None: freshly initialised, lora_b = 0)."""

    fine_tune_type: str
    num_layers: int
    lora_parameters: dict
    weights: str | Path | None = None

    @classmethod
    def saved(cls, folder: str | Path) -> Adapters:
        """The adapters of an mlx-lm adapter folder (adapter_config.json, adapters.safetensors)."""
        folder = Path(folder)
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            raise InputError(f"{folder}: not an adapter folder (no adapter_config.json)")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise InputError(
                one_line(f"{folder}: not an adapter folder ({type(e).__name__}: {e})")
            ) from None
        if not (folder / "adapters.safetensors").is_file():
            raise InputError(f"{folder}: no adapters.safetensors")
        if not isinstance(config.get("num_layers"), int):
            raise InputError(f"{config_file}: num_layers: missing or not an integer")
        return cls(
            config.get("fine_tune_type", "lora"),
            config["num_layers"],
            config.get("lora_parameters") or {},
            folder / "adapters.safetensors",
        )


def open_model(
    model_path: Path, *, adapters: Adapters | str | Path | None = None
) -> tuple[nn.Module, Leaves | None]:
    """The weights of a folder from `open_tokenizer`, and with `adapters` (an adapter folder, or
    `Adapters` to train) those attached → (model, base): base is the trainable leaves with the
    adapters off (the `base` teacher, the reference of retention), None without adapters. An
    adapter folder is checked before any weights load, and its model is left in eval mode.
    InputError for adapters that do not fit the model (trained on another one)."""
    saved = (
        isinstance(adapters, (str, Path)) and str(adapters) != ""
    )  # an empty --adapter-path: none
    spec = Adapters.saved(adapters) if saved else adapters or None
    if saved:  # names, shapes, rank and scale, on the model's shapes alone
        check_adapter_fit(
            model_path,
            spec.weights,
            spec.fine_tune_type,
            spec.num_layers,
            spec.lora_parameters,
            Path(adapters) / "adapter_config.json",
        )
    model, _ = load_model(model_path)
    if spec is None:
        return model, None
    base = attach_adapters(
        model, spec.fine_tune_type, spec.num_layers, spec.lora_parameters, spec.weights
    )
    if saved:
        model.eval()
    return model, base


def _make_trainable(
    model: nn.Module, fine_tune_type: str, num_layers: int, lora_parameters: dict
) -> None:
    num_blocks = len(model.layers)
    if num_layers > num_blocks:
        raise InputError(f"--num-layers: {num_layers} but the model has {num_blocks} blocks")
    model.freeze()
    if fine_tune_type == "full":
        for block in model.layers[-max(num_layers, 0) :]:
            block.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=fine_tune_type == "dora")


def attach_adapters(
    model: nn.Module,
    fine_tune_type: str,
    num_layers: int,
    lora_parameters: dict,
    weights: str | Path | None = None,
) -> Leaves:
    """Freeze the model and make the chosen layers trainable, as mlx_lm.lora does; then load
    `weights` (adapter or full-layer weights) if given, once `fitting_adapters` has checked them.

    Returns the trainable leaves before `weights` load: the `base` teacher, so that `base`
    always means "adapters off" (lora_b = 0), whatever was loaded on top.
    """
    _make_trainable(model, fine_tune_type, num_layers, lora_parameters)
    base = {
        k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())
    }  # a copy, as core.teacher.copy_leaves
    if weights:
        fitting = fitting_adapters(model, Path(weights), fine_tune_type, lora_parameters)
        model.load_weights(list(fitting.items()), strict=False)
    # base too: a lazy copy is bound to this thread's stream, and serve swaps it in on its worker thread
    mx.eval(model.parameters(), base)
    return base


def check_adapter_fit(
    model_path: Path,
    weights: Path,
    fine_tune_type: str,
    num_layers: int,
    lora_parameters: dict,
    config_file: Path | None = None,
) -> None:
    """`fitting_adapters` before any weights load: the model is built lazily (shapes, no data).
    `config_file`: the adapter_config.json that gave num_layers, named if the model is shallower."""
    model, _ = load_model(model_path, lazy=True)
    if config_file is not None and num_layers > len(model.layers):
        raise InputError(
            f"{config_file}: num_layers {num_layers} but the model has {len(model.layers)} blocks; "
            f"adapters trained on another model?"
        )
    _make_trainable(model, fine_tune_type, num_layers, lora_parameters)
    fitting_adapters(model, weights, fine_tune_type, lora_parameters)


def _shape(a) -> str:
    return "x".join(map(str, a.shape))


def fitting_adapters(
    model: nn.Module, path: Path, fine_tune_type: str, lora_parameters: dict
) -> dict[str, mx.array]:
    """The tensors of an adapter (or full-layer) file, checked against the trainable parameters
    `attach_adapters` made: the same names and shapes (so the rank, the adapted blocks and the
    fine-tune type agree), and, when the file's folder holds its adapter_config.json, the same
    fine-tune type, rank and scale. Any mismatch is an InputError naming the file and the first
    mismatching tensor with both shapes: loading it anyway would train from zero, save weights
    of one rank under a config of another, or fail deep inside MLX."""
    if path.is_dir():
        raise InputError(
            f"{path}: a folder; name the adapter file in it ({path / 'adapters.safetensors'})"
        )
    if not path.is_file():
        raise InputError(f"{path}: no such adapter file")
    try:
        weights = mx.load(str(path))
    except Exception as e:  # noqa: BLE001  (MLX raises a bare RuntimeError/ValueError for a bad file)
        raise InputError(
            f"{path}: not a safetensors adapter file ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    wanted = dict(tree_flatten(model.trainable_parameters()))
    for name in sorted(weights):
        if name not in wanted:
            raise InputError(
                f"{path}: does not fit the model and options: it holds {name} ({_shape(weights[name])}), "
                f"which --fine-tune-type {fine_tune_type} with this --num-layers does not train here"
            )
        if weights[name].shape != wanted[name].shape:
            raise InputError(
                f"{path}: does not fit the model and options: {name} is {_shape(weights[name])} in the "
                f"file but {_shape(wanted[name])} here"
            )
    missing = sorted(wanted.keys() - weights.keys())
    if missing:
        raise InputError(
            f"{path}: does not fit the model and options: it has no {missing[0]} "
            f"({_shape(wanted[missing[0]])} here); it adapts other blocks or another fine-tune type"
        )
    _check_saved_options(path, fine_tune_type, lora_parameters)
    return weights


def _check_saved_options(path: Path, fine_tune_type: str, lora_parameters: dict) -> None:
    """Rank and scale are not all visible in the tensors (scale not at all): compare them with
    the adapter_config.json saved beside the file, when there is one."""
    try:
        saved = json.loads((path.parent / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return
    pairs = [("fine_tune_type", saved.get("fine_tune_type", "lora"), fine_tune_type)]
    if fine_tune_type != "full":
        lora = saved.get("lora_parameters") or {}
        pairs += [
            (f"lora_parameters.{k}", lora.get(k), lora_parameters.get(k)) for k in ("rank", "scale")
        ]
    for name, theirs, ours in pairs:
        if theirs is not None and theirs != ours:
            raise InputError(
                f"{path}: saved with {name} {theirs} (its adapter_config.json) but this run uses {ours}"
            )
