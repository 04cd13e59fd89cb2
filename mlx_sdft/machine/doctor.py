"""`mlx-sdft doctor`: what this machine gives MLX (backend, device, memory, BLAS, versions)."""

from __future__ import annotations

import os
import platform

import mlx.core as mx

from mlx_sdft import package_versions
from mlx_sdft.machine.blas import EXPLICIT, OPT_OUT, describe
from mlx_sdft.machine.memory import available_gb


def blas() -> str:
    """Which BLAS the process mapped, with the way out of the slow reference BLAS on Linux."""
    what = describe()
    if platform.system() != "Linux" or not what.startswith("reference"):
        return what
    if os.environ.get(OPT_OUT, "").lower() == "reference":
        return f"{what}, kept by {OPT_OUT}=reference"
    return (
        f"{what}: slow; apt-get install libopenblas0-pthread (picked up automatically), "
        f"or set {EXPLICIT}=/path/to/libopenblas.so.0"
    )


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
        **package_versions(),
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
        if mx.distributed.is_available()
        else "not available",
    }
