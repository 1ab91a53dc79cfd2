#!/usr/bin/env bash
# The two prepared commands for a GPU machine (the device tool's H200: Python 3.12, torch 2.11,
# nvcc 13, no internet), each at most about 8 minutes:
#
#   bash scripts/gpu_check.sh test    (a) build with the CUDA kernels; the CUDA tests (full log,
#                                         JUnit XML); compute-sanitizer memcheck and racecheck on
#                                         scripts/sanitize_ops.py (every op, forward and backward)
#   bash scripts/gpu_check.sh bench   (b) the benchmarks (needs (a)'s build)
#
# Every step writes its own log under $OUT (default results/gpu) and its exit status to
# $OUT/status.txt; a failing step does not stop the ones after it (no set -e), nothing is filtered
# or cut (the console shows each log's last lines, the files keep everything), and the command
# exits non-zero when any step failed. Each step has a time limit (seconds, env *_S below).
# Dry run here (no GPU; the CUDA tests skip): DEVICE=cpu PY=.venv/bin/python SKIP_BUILD=1 ...
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT"
STATUS="$OUT/status.txt"
failed=0

# step NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log, records its status.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" start rc
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$STATUS"
  tail -n "${TAIL_LINES:-15}" "$log"
  if [ "$rc" -ne 0 ]; then failed=1; fi
  return "$rc"
}

machine() {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'gpu', torch.cuda.is_available())"
  which compute-sanitizer nvcc
  true
}
export -f machine  # step runs commands under timeout, which needs a program: bash -c machine
export PY

case "$MODE" in
test)
  : >"$STATUS"
  step machine 60 bash -c machine
  if [ -z "${SKIP_BUILD:-}" ]; then
    step build "${BUILD_S:-330}" "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
      -Cbuild-dir=build/gpu-check -Ccmake.define.HALFVAE_CUDA=ON \
      -Ccmake.define.TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST"
  fi
  step kernels 60 "$PY" -c "import halfvae_ext as h
print('cuda kernels compiled:', h.cuda_kernels_compiled(), 'usable:', h.cuda_kernels_available())
assert h.cuda_kernels_compiled(), 'CUDA kernels missing'"
  # Every test that runs CUDA code: test_cuda.py and the CUDA cases of the other files (their
  # ids name cuda). -rfEs lists failures, errors and skips with reasons; --tb=long keeps the
  # tracebacks; the XML has every case.
  step tests "${TESTS_S:-240}" "$PY" -m pytest -p no:cacheprovider -rfEs --tb=long \
    --junitxml="$OUT/tests.xml" tests/test_cuda.py tests/test_latent_tables.py \
    tests/test_rng.py tests/test_reparam_gmm_kl.py tests/test_torch_integration.py \
    tests/test_conditional_prior.py tests/test_models.py -k cuda
  for tool in memcheck racecheck; do
    if [ "$DEVICE" = cuda ]; then
      step "sanitizer_$tool" "${SANITIZER_S:-120}" compute-sanitizer --tool "$tool" \
        --error-exitcode 1 "$PY" scripts/sanitize_ops.py --device cuda
    else  # a dry run: the workload alone
      step "sanitizer_$tool" "${SANITIZER_S:-120}" "$PY" scripts/sanitize_ops.py --device "$DEVICE"
    fi
  done
  ;;
bench)
  : >>"$STATUS"
  step machine_bench 60 bash -c machine
  ROWS_LOG2=${ROWS_LOG2:-26}  # N*K = 2^26 with K = 8: N = 2^23
  # The fused op (eps given and in-kernel) against eager, torch.compile and a device copy of the
  # same bytes, float32, K = 8, C = 3, forward+backward.
  step bench_ops "${BENCH_OPS_S:-240}" "$PY" -m benchmarks.bench_ops --device "$DEVICE" \
    --sizes "$ROWS_LOG2" --components 3 --variants mc --budget "${BUDGET:-0.5}" \
    --slow-max-log2 "$ROWS_LOG2" --out "$OUT"
  step bench_quick "${BENCH_QUICK_S:-90}" "$PY" benchmarks/bench_quick.py --device "$DEVICE" \
    --rows $(( 2 ** (ROWS_LOG2 - 3) )) --repeats 20 --json "$OUT/bench_quick.json"
  # The fused table step at 10^8 rows against nn.Embedding(sparse=True) + SparseAdam.
  step bench_tables "${BENCH_TABLES_S:-180}" "$PY" scripts/gpu_bench_tables.py \
    --device "$DEVICE" --rows "${TABLE_ROWS:-1e8}" --steps "${TABLE_STEPS:-50}" \
    --json "$OUT/bench_tables.json"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh test|bench   (logs in \$OUT, default results/gpu)" >&2
  exit 2
  ;;
esac
echo "== status ($STATUS)"
cat "$STATUS"
exit "$failed"
