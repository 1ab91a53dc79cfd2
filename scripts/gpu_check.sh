#!/usr/bin/env bash
# One prepared command for a GPU machine (the device tool's H200: Python 3.12, torch 2.11, nvcc 13,
# no internet): build the extension from source with the CUDA kernels, run the CUDA tests and the
# quick benchmark on the GPU. Everything it prints also lands in $OUT (default results/gpu).
#   device: bash scripts/gpu_check.sh          here (no GPU: tests skip): PY=.venv/bin/python ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

echo "== build"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  -Cbuild-dir=build/gpu-check -Ccmake.define.HALFVAE_CUDA=ON \
  -Ccmake.define.TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST"
echo "build took $(( $(date +%s) - start )) s"
"$PY" -c "import halfvae_ext as h; assert h.cuda_kernels_compiled(), 'CUDA kernels missing'
print('cuda kernels: compiled, usable:', h.cuda_kernels_available())"

echo "== tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_reparam_gmm_kl.py \
  tests/test_rng.py tests/test_torch_integration.py tests/test_latent_tables.py 2>&1 | tail -25 \
  || echo "TESTS FAILED"

echo "== benchmark"
if "$PY" -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)"; then
  for rows in $((2**20)) $((2**23)) $((2**26)); do
    "$PY" benchmarks/bench_quick.py --device cuda --rows "$rows" --repeats 20 \
      --json "$OUT/bench_cuda_$rows.json"
  done
  "$PY" benchmarks/bench_quick.py --device cuda --rows $((2**23)) --dtype bfloat16 --repeats 20
  # The suite: ratios against eager / distributions / torch.compile and the copy floor.
  "$PY" -m halfvae_ext.bench_ops --device cuda --sizes 20,24,26,27 --components 3 --budget 0.5 \
    --out "$OUT" 2>&1 | grep -v "^USDT\|^ERROR"
  # The general kernels (kl="bound", priors chosen per row) against the specialized Monte-Carlo
  # one, forward+backward with prior gradients (each op call also syncs once to check
  # prior_index's range).
  if "$PY" - <<'PY'
import statistics
import torch
import halfvae_ext as hv
N, K, C, U = 2**23, 8, 3, 40
mu = torch.randn(N, K, device="cuda", requires_grad=True)
logvar = (0.1 * torch.randn(N, K, device="cuda")).requires_grad_()
prior = lambda *shape: [torch.randn(*shape, device="cuda", requires_grad=True) for _ in range(3)]
index = torch.randint(0, U, (N,), device="cuda")
cases = [("mc, one prior", prior(K, C), None, "mc"),
         ("bound, one prior", prior(K, C), None, "bound"),
         ("mc, U=40", prior(U, K, C), index, "mc"),
         ("bound, U=40", prior(U, K, C), index, "bound"),
         ("mc, U=40 sorted", prior(U, K, C), index.sort().values, "mc")]
gen = torch.Generator(device="cuda").manual_seed(0)
for name, p, pi, kl in cases:
    def step():
        z, k = hv.reparam_gmm_kl(mu, logvar, *p, generator=gen, prior_index=pi, kl=kl)
        torch.autograd.grad(k.sum() + z.sum(), [mu, logvar, *p])
    step()
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); s.record(); step(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    print(f"reparam_gmm_kl fwd+bwd N*K=2^26 {name:18s} {statistics.median(times):8.3f} ms")
PY
  then :; else echo "GENERAL KERNEL TIMING FAILED"; fi
  "$PY" - <<'PY'
import torch
x = torch.empty(2**28, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda.synchronize(); s.record()
for _ in range(10): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"device copy: {2 * x.numel() * 4 * 10 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s (read+write)")
PY
else
  echo "no GPU: benchmark skipped"
fi
