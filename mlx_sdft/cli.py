"""`mlx-sdft`: parse flags, validate, call the library. No math and no loops here.

The `train` flags are generated from `Config`'s fields, so every default and help text is
written once, in config.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Annotated, Optional

import typer

from mlx_sdft.config import Config, cli_fields, load_config
from mlx_sdft.errors import InputError, TrainingError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-Distillation Fine-Tuning (SDFT) on MLX.")

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _fail(message: str, code: int) -> None:
    typer.echo(f"mlx-sdft: error: {message}", err=True)
    raise typer.Exit(code)


def _train(config: Optional[str] = None, **flags) -> None:
    try:
        cfg = load_config(config, flags)
        from mlx_sdft.train import run  # heavy imports only once the input is known to be good

        run(cfg)
    except InputError as e:
        _fail(str(e), 2)
    except TrainingError as e:
        _fail(str(e), 1)
    typer.echo(
        f"Adapters saved to {cfg.adapter_path}. Use them with:\n"
        f"  mlx_lm.generate --model {cfg.model} --adapter-path {cfg.adapter_path} --prompt \"...\""
    )


def _option(f: dataclasses.Field) -> inspect.Parameter:
    kind = _TYPES[f.type.split(" | ")[0]]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = repr(default) if isinstance(default, str) and "\n" in default else default
    help = f"{f.metadata['help']} [default: {shown}]"
    if f.metadata["choices"]:
        help += f" [choices: {', '.join(f.metadata['choices'])}]"
    annotation = Annotated[Optional[kind], typer.Option(help=help, show_default=False)]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


_config_param = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[str], typer.Option("-c", "--config", help="YAML file with options (flags override it).")],
)
_train.__signature__ = inspect.Signature([_config_param, *map(_option, cli_fields())])
app.command("train", help="Train LoRA adapters with SDFT on demonstrations.")(_train)


@app.callback()
def main() -> None:
    """Self-Distillation Fine-Tuning (SDFT) on MLX."""


if __name__ == "__main__":
    sys.exit(app())
