"""`mlx-sdft doctor`: what this machine gives MLX (backend, device, memory, BLAS, versions)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import mlx.core as mx

from mlx_sdft.checkpoint import versions
from mlx_sdft.memory import available_gb


def blas() -> str:
    """Which BLAS the process mapped: MLX's Linux CPU wheel is ~26x faster with OpenBLAS preloaded."""
    if platform.system() == "Darwin":
        return "Accelerate"
    maps = Path("/proc/self/maps")
    libs = maps.read_text() if maps.exists() else ""
    if "openblas" in libs:
        return "OpenBLAS"
    return "reference BLAS (slow; see the README for LD_PRELOAD of OpenBLAS)"


def backend() -> str:
    if mx.metal.is_available():
        return "Metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "CUDA"
    return "CPU"


def report() -> dict:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    have, what = available_gb()
    return {
        **versions(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "backend": backend(),
        "default_device": str(mx.default_device()),
        "device_name": info.get("device_name", ""),
        "memory_gb": round(have, 1),
        "memory_kind": what,
        "blas": blas() if backend() == "CPU" else "n/a (GPU)",
        "cpu_count": os.cpu_count(),
        "distributed": f"available, this process is rank {mx.distributed.init().rank()} of {mx.distributed.init().size()}"
        if mx.distributed.is_available() else "not available",
    }
