"""The batch's common prompt prefix computed once (`decode.common_length`) vs not, in one process:
the teacher's scores and the student's loss and gradient (the SFT term included) of one
quickstart-shaped micro-batch at SmolLM2-135M shapes (random float32 weights, LoRA rank 8): 4
prompts sharing a 25-token prefix (the chat template's system prompt and user-turn opening, as
SmolLM2's), student prompts of 37-39 tokens, teacher prompts of 66-70, completions of 14 tokens,
demonstrations of 10. Six interleaved repetitions, the first dropped; median wall and CPU seconds.

Run: python bench/common_prefix_ab.py   (~2 min on 2 cores)
"""

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does
import mlx.core as mx, mlx.nn as nn
from mlx_lm.models import llama
from shapes import FULL
from mlx_sdft.formats.models import attach_adapters
from mlx_sdft.config import Config
from mlx_sdft.core.objective import ObjectiveArgs, sdft_objective
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core import decode, guards

mx.random.seed(0)
model = llama.Model(llama.ModelArgs.from_dict(FULL["model"]))
mx.eval(model.parameters())
attach_adapters(model, "lora", 30, {"rank": 8, "scale": 20.0, "dropout": 0.0})
V = FULL["model"]["vocab_size"]
ids = lambda n: mx.random.randint(0, V, (n,)).tolist()
common = ids(25)
pairs = [
    PromptPair(common + ids(12 + i % 3), common + ids(41 + i % 5), ids(10), f"b:{i}")
    for i in range(4)
]
comps = [ids(14) for _ in range(4)]
cfg = Config(batch_size=4)
obj = sdft_objective(ObjectiveArgs.of(cfg))
scores = obj.teacher_scores(model, pairs, comps)
mx.eval(scores)
guard = guards.Guard([False] * 4, None)
g = nn.value_and_grad(model, lambda m: obj.student_loss(m, pairs, comps, scores, guard)[0])
real = decode.common_length


def run(f, P_on):
    decode.common_length = real if P_on else (lambda prompts: 0)
    c0 = time.process_time()
    t0 = time.perf_counter()
    mx.eval(f())
    return time.perf_counter() - t0, time.process_time() - c0


res = {k: [] for k in ["teacher on", "teacher off", "student on", "student off"]}
for rep in range(6):
    for on in [True, False] if rep % 2 == 0 else [False, True]:
        res[f"teacher {'on' if on else 'off'}"].append(
            run(lambda: obj.teacher_scores(model, pairs, comps), on)
        )
        res[f"student {'on' if on else 'off'}"].append(run(lambda: g(model), on))
for k, v in res.items():
    w = [a for a, _ in v[1:]]
    c = [b for _, b in v[1:]]
    print(k, "wall median %.3f  cpu median %.3f" % (statistics.median(w), statistics.median(c)))
