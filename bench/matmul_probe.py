"""What a decode step's matmuls cost on this device: one SmolLM2-135M MLP projection (576 → 1536,
float32) at M = 1, 2, 4 and 8 rows, alone and as 210 in one graph (30 blocks × 7 linears, as one
decode step of the model runs them). ms per call, mean of 200 (20 for the graph) after warm-up.

Run: python bench/matmul_probe.py   (on a GPU it shows MLX CUDA's gemv path at M = 1 against its
general matmul at M > 1; bench/README.md, issue 18)
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlx_sdft  # noqa: E402,F401  first: loads OpenBLAS on the CPU, as the trainer does
import mlx.core as mx  # noqa: E402


def timed(f, n: int = 200) -> float:
    for _ in range(20):
        mx.eval(f())
    mx.synchronize()
    tic = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    mx.synchronize()
    return (time.perf_counter() - tic) / n * 1e3


if __name__ == "__main__":
    print(f"mlx {mx.__version__} on {mx.default_device()}")
    W = mx.random.normal((1536, 576))
    mx.eval(W)
    for M in (1, 2, 4, 8):
        x = mx.random.normal((M, 576))
        mx.eval(x)
        one, graph = timed(lambda: x @ W.T), timed(lambda: [x @ W.T for _ in range(210)], 20)
        print(f"matmul M={M} 576->1536: {one:.4f} ms;  x 30 layers x 7 = {graph:.3f} ms")
