#!/usr/bin/env bash
# Run the test suite and the benchmark on MLX's CUDA backend, on a machine whose Python already
# has the NVIDIA libraries (CUDA 13) but no network: MLX and the few missing packages come as
# carried wheels (.whl/) and mlx-cuda-13 as an xz tarball split in parts (.cuda/, /tmp/mc/).
# Writes everything under $OUT. Usage: bash bench/cuda_check.sh
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
timeout 240 python3 -m pytest -q -x -p no:cacheprovider --deselect tests/test_distributed.py 2>&1 | tail -30 | tee "$OUT/pytest.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py 2>&1 | tail -15 | tee "$OUT/pytest_distributed.txt"
if [[ -f bench/bench.py ]]; then
  timeout 200 python3 bench/bench.py --json "$OUT/bench.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
fi
if [[ -f bench/sampling.py ]]; then  # fused adapters, the decode loop, shared prefill: where they should pay most
  timeout 200 python3 bench/sampling.py --json "$OUT/sampling.json" 2>&1 | tail -20 | tee "$OUT/sampling.txt"
fi
