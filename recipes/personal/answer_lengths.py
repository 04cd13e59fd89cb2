"""How long a model's greedy answers are when told an end-of-answer rule (what --end-rule-tokens is
set from), and whether it follows the rule: 16 general + 16 topic prompts of the bundled pools.

    python recipes/personal/answer_lengths.py MODEL   # e.g. the folder `mlx-sdft export --model QWEN.gguf` writes
"""

import json, sys, time
from pathlib import Path
import mlx_sdft  # noqa: F401  (OpenBLAS first)
from mlx_lm import load
from mlx_sdft.measure.rules import greedy, told

root = Path(mlx_sdft.__file__).parent / "assets"
ps = [json.loads(l)["prompt"] for l in (root / "general_prompts.jsonl").read_text().splitlines()][
    :16
]
ps += [json.loads(l)["prompt"] for l in (root / "topic_prompts.jsonl").read_text().splitlines()][
    :16
]
model, tok = load(sys.argv[1])
rule = "Always end your answer with the signature '- Sam' on its own line."
msgs = told(tok, [[{"role": "user", "content": p}] for p in ps], rule)
t = time.time()
ans = greedy(model, tok, msgs, 512, 16)
lens = sorted(len(i) for i in ans.ids)
print("seconds", round(time.time() - t), "lengths", lens)
for cap in (64, 128, 192, 256, 384, 512):
    print(
        cap,
        "ended within:",
        sum(1 for i, tr in zip(ans.ids, ans.truncated) if not tr and len(i) <= cap),
        "/",
        len(lens),
    )
print("signature followed:", sum("- Sam" in x[-40:] for x in ans.texts), "/", len(lens))
