"""Which BLAS serves MLX's CPU matmuls: picking and preloading OpenBLAS on Linux, and describing
what the process mapped.

The Linux mlx[cpu] wheel links a reference BLAS, ~26x slower at matmul than OpenBLAS. A libopenblas
loaded with RTLD_GLOBAL before libmlx is dlopened wins its cblas_* lookups (the global scope is
searched before libmlx's own dependencies), exactly like LD_PRELOAD; loaded after, it does nothing.
So this module imports nothing from MLX, and mlx_sdft/__init__.py calls preload() first.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings
from pathlib import Path

# The fix a CPU run on the reference BLAS prints: Debian/Ubuntu's pthread OpenBLAS (6.7 MB download),
# which preload() then finds by itself.
FIX = "sudo apt-get install -y libopenblas0-pthread (Fedora: dnf install openblas)"
OPT_OUT = "MLX_SDFT_BLAS"  # =reference keeps the wheel's BLAS
EXPLICIT = "MLX_SDFT_OPENBLAS"  # a path to the libopenblas to load


def candidates(machine: str) -> list[str]:
    """Standard OpenBLAS paths, pthread builds first: Debian/Ubuntu multiarch, Fedora/RHEL, Arch."""
    multiarch = f"/usr/lib/{machine}-linux-gnu"
    return [
        f"{multiarch}/openblas-pthread/libopenblas.so.0",
        f"{multiarch}/libopenblas.so.0",
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]


def choose(explicit: str | None, paths: list[str]) -> str | None:
    """The explicit path if it exists (warned about if not: it was the user's intent), else the first
    existing candidate, else None."""
    if explicit:
        if Path(explicit).is_file():
            return explicit
        warnings.warn(
            f"{EXPLICIT}={explicit} does not exist; looking for OpenBLAS in the standard paths",
            stacklevel=2,
        )
    return next((p for p in paths if Path(p).is_file()), None)


def mapped(maps: str) -> list[str]:
    """Paths of the BLAS libraries in a /proc/<pid>/maps text, sorted."""
    return sorted(
        {line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line}
    )


def describe() -> str:
    """Which BLAS MLX's matmuls run on. numpy's libscipy_openblas (prefixed symbols) serves numpy
    only, so it does not count."""
    if sys.platform == "darwin":
        return "Accelerate"
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return "unknown (no /proc/self/maps)"
    libs = mapped(maps.read_text())
    openblas = [p for p in libs if Path(p).name.startswith("libopenblas")]
    if openblas:
        how = "LD_PRELOAD" if "openblas" in os.environ.get("LD_PRELOAD", "") else "preloaded"
        return f"OpenBLAS ({how}: {openblas[0]})"
    ref = [Path(p).name for p in libs if Path(p).name.startswith("libblas")]
    return f"reference BLAS of the mlx-cpu wheel ({ref[0] if ref else 'libblas'})"


def warning(described: str | None = None) -> str | None:
    """One line for a run whose matmuls go to the CPU's reference BLAS (~20x slower than OpenBLAS),
    with the fix; None on a GPU, with Accelerate or with OpenBLAS."""
    import mlx.core as mx

    described = described or describe()
    if mx.default_device() != mx.cpu or not described.startswith("reference BLAS"):
        return None
    return (
        f"warning: MLX's matmuls run on its reference BLAS, ~20x slower than OpenBLAS. Fix: {FIX}"
    )


def warn(console) -> None:
    """Print warning() on `console` (a rich Console) as one unwrapped line, once the input is checked."""
    line = warning()
    if line:
        console.print(line, style="yellow", soft_wrap=True, highlight=False)


def preload() -> str | None:
    """Load OpenBLAS globally before mlx.core on Linux; the path loaded, or None (not Linux, opted
    out, mlx.core already imported, already preloaded, none found, or it failed to load)."""
    if (
        sys.platform != "linux"
        or "mlx.core" in sys.modules
        or os.environ.get(OPT_OUT, "").lower() == "reference"
    ):
        return None
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return None  # a second OpenBLAS would only add a thread pool
    path = choose(os.environ.get(EXPLICIT), candidates(platform.machine()))
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None  # the reference BLAS stays: slower, still correct
    return path
