#!/usr/bin/env bash
# The GPU check of issue 4, prepared to run in one call on a lent CUDA machine (the device tool;
# ../.library/device/KINDS.md describes the machine). It runs with that machine's own python3
# (PyTorch with CUDA). diffusers is not installed there and nothing can be fetched, so its wheel
# travels with the tree: run `make gpu-wheels` here first, then (from the repository root)
#
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-wheels"], timeout_s=560)
#
# It writes under $OUT (default runs/gpu-check): env.txt, test-cuda.txt and performance-gpu.md
# (`lowbit bench --device cuda`: bf16 eager/compiled vs lowbit W8A8 (_int_mm) and FP8 (_scaled_mm)
# on the SD-like UNet, ratios to bf16 in one run). Each step has its own time limit (about 8 min
# in all), so a slow compile cannot eat the whole device budget; the exit status is the first
# failing step's. A second try will not fit a 15-minute lease: NO_COMPILE=1 skips the compiled
# variants, REPEATS=2 shortens the timing. On the GPU the batch is 32 (BATCH=...): at the
# model's CPU batch of 4 an H200 would mostly wait on kernel launches, in bf16 and int8 alike.
# On a machine without CUDA it runs the same steps on the CPU (the tests skip, the benchmark runs
# --device cpu), which is how this script itself is checked.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
status=0
step() {  # step NAME LIMIT_S COMMAND...: run, tee into $OUT/NAME.txt, remember the first failure
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$OUT/$name.txt"
  [ "$status" -eq 0 ] && [ "$rc" -ne 0 ] && status=$rc
  return 0
}
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    echo "diffusers is not installed and .gpu-wheels/ is empty: run 'make gpu-wheels' and carry .gpu-wheels" >&2
    exit 3
  fi
  "$PY" -m pip install -q --no-index --no-deps .gpu-wheels/*.whl || exit 3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
step env 60 "$PY" -c "import torch, diffusers, lowbit; print('torch', torch.__version__, '| diffusers', diffusers.__version__,
  '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-',
  torch.cuda.get_device_capability(0) if torch.cuda.is_available() else '')"
step test-cuda 90 "$PY" -m pytest -q -ra -p no:cacheprovider tests/kernels/test_cuda.py
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then dev=cuda; else dev=cpu; fi
step bench 400 "$PY" -c "import sys; from lowbit.cli import main; sys.exit(main())" \
  bench --device "$dev" --recipes w8a8 fp8 --batch "${BATCH:-$([ $dev = cuda ] && echo 32 || echo 4)}" --repeats "${REPEATS:-5}" ${NO_COMPILE:+--no-compile} \
  --out "$OUT/performance-gpu.md"
exit "$status"
