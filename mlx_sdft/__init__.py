"""mlx-sdft: Self-Distillation Fine-Tuning on MLX."""

# First, before anything imports mlx.core: OpenBLAS must be loaded before libmlx to serve its matmuls.
from mlx_sdft.machine.blas import preload as _preload

_preload()

__version__ = "0.1.0"


def package_versions() -> dict:
    """The versions a run records (trainer_state.json, adapter_config.json, a version's record) and doctor shows."""
    from importlib.metadata import version

    return {"mlx_sdft": __version__, "mlx": version("mlx"), "mlx_lm": version("mlx-lm")}
