# What a decode step's pieces cost on this device: matmuls of a SmolLM2 linear at M = 1 and 4,
# and one model call at batch 1 and 4 (ms per call, mean of 200 after warm-up).
import time, mlx.core as mx
def t(f, n=200):
    for _ in range(20): mx.eval(f())
    mx.synchronize(); tic = time.perf_counter()
    for _ in range(n): mx.eval(f())
    mx.synchronize(); return (time.perf_counter() - tic) / n * 1e3
W = mx.random.normal((1536, 576)); mx.eval(W)
for M in (1, 2, 4, 8):
    x = mx.random.normal((M, 576)); mx.eval(x)
    print(f"matmul M={M} 576->1536: {t(lambda: x @ W.T):.4f} ms;  x 30 layers x 7 = {t(lambda: [x @ W.T for _ in range(210)], 20):.3f} ms")
