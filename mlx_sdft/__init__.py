"""mlx-sdft: Self-Distillation Fine-Tuning on MLX."""

# First, before anything imports mlx.core: OpenBLAS must be loaded before libmlx to serve its matmuls.
from mlx_sdft.machine.blas import preload as _preload

_preload()

__version__ = "0.1.0"
