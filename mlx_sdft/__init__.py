"""mlx-sdft: Self-Distillation Fine-Tuning on MLX."""

__version__ = "0.1.0"
