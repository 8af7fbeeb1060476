#!/usr/bin/env bash
# GPU check for a machine with one GPU and no network, run from the repository root:
#
#   bash benchmarks/device_check.sh          # logs and JSON under $OUT (default ./device_out)
#
# Needs the wheels of .whl/ (README.md, "GPUs": mpich for mpiexec and libmpi, mpi4py,
# pytest-mpi); CuPy, PyTorch, pytest and pytest-timeout come with the machine. Steps: install
# the wheels; nvidia-smi; a 2-rank MPI smoke test; the GPU tests at 1 rank and at 2 ranks
# sharing the GPU (staged path forced); the GPU benchmark (benchmarks/bench_gpu.py: compute at
# 1 rank, collectives at 2); whether NCCL accepts 2 ranks on one GPU; the GPU tests at 2 ranks
# with auto; train.py on the GPU (float32, float16 mixed precision at 2 ranks, pp=2 and tp=2 with
# sequence parallelism at 2 ranks on the staged path; a fresh Llama-family model at tp 2 with its KV
# heads split and replicated; AdamW sharded over 2 DP ranks); a server on the GPU answering streamed
# completions (benchmarks/bench_serve.py --smoke, tp 1 and 2), its paged KV cache and prefix caching
# (benchmarks/bench_paged.py --smoke). Every step has a
# time limit taken from a 7.5-minute budget, so the script ends in time whatever happens; a
# failed step is reported and the next one runs. Files under $OUT: device_check.log (all
# output), summary.txt (one line per step: name, exit status, seconds), nvidia-smi.txt,
# bench_gpu.json, bench_gpu_comm.json, train_metrics.jsonl.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-450}  # seconds for the whole script
START=$SECONDS
LOG=$OUT/device_check.log
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

# step NAME LIMIT CMD...: run CMD under `timeout`, at most LIMIT seconds and never past the budget.
step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((BUDGET - (SECONDS - START) - 5))
    if ((left < 10)); then
        echo "=== $name: skipped, budget spent"
        echo "$name skipped 0" >> "$SUMMARY"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s, $((SECONDS - START))s into the check)"
    t0=$SECONDS
    timeout -k 5 "$limit" "$@"
    rc=$?
    ((rc == 124 || rc == 137)) && echo "=== $name: TIMED OUT after ${limit}s"
    echo "=== $name: exit $rc in $((SECONDS - t0))s"
    echo "$name $rc $((SECONDS - t0))" >> "$SUMMARY"
    return 0
}

export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4
export CUPY_CACHE_DIR=/tmp/cupy_kernel_cache

# ---- the carried wheels: Python packages into /tmp/site, MPICH (bin/, lib/) into /tmp/mpich
install() {
    local pkgs
    pkgs=$(ls .whl/*.whl 2>/dev/null | grep -v '/mpich-')
    if [[ -n $pkgs ]]; then
        # shellcheck disable=SC2086
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $pkgs || return 1
    fi
    if ls .whl/mpich-*.whl > /dev/null 2>&1; then
        # --target drops a wheel's data files (lib/libmpi.so.12, bin/mpiexec); --prefix keeps them.
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed --prefix /tmp/mpich .whl/mpich-*.whl || return 1
    fi
}
export -f install
step install-wheels 120 bash -c install
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [[ -x /tmp/mpich/bin/mpiexec ]]; then
    export PATH=/tmp/mpich/bin:$PATH
    export MPI4PY_LIBMPI=/tmp/mpich/lib/libmpi.so.12  # mpi4py 4 wheels load this libmpi
fi
MPIEXEC=$(command -v mpiexec || echo mpiexec)

step nvidia-smi 30 bash -c "nvidia-smi 2>&1 | tee '$OUT/nvidia-smi.txt'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv"
step versions 60 python3 -c "
import sys, numpy, cupy, mpi4py
from mpi4py import MPI
print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'mpi4py', mpi4py.__version__, mpi4py.__file__)
print(MPI.Get_library_version().splitlines()[0])
print('devices', cupy.cuda.runtime.getDeviceCount(), 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())
from mpisplit.runtime.device import mpi_cuda_support, nccl_available
print('CUDA-aware MPI:', mpi_cuda_support(), '| NCCL:', nccl_available())
try:
    import ml_dtypes; print('ml_dtypes', ml_dtypes.__version__)
except ImportError as e: print('ml_dtypes missing', e)
"

# ---- MPI at 2 ranks; if the default network module cannot start here, try the OFI one.
smoke() {
    "$MPIEXEC" -n 2 python3 -c "
from mpi4py import MPI
import numpy as np
c = MPI.COMM_WORLD; x = np.ones(4) * (c.rank + 1); c.Allreduce(MPI.IN_PLACE, x)
assert x[0] == 3.0, x
print('rank', c.rank, 'of', c.size, 'allreduce ok', MPI.Get_processor_name())"
}
export -f smoke
export MPIEXEC
step mpi-smoke 40 bash -c smoke
if ! grep -q '^mpi-smoke 0 ' "$SUMMARY"; then
    export MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp
    step mpi-smoke-ofi 40 bash -c smoke
fi

PYTEST=(python3 -m pytest -q -p no:cacheprovider -o timeout=120)
GPU_TESTS=(tests/test_gpu.py tests/test_comm.py tests/test_backend.py)

step gpu-tests-1rank 150 "${PYTEST[@]}" --with-mpi -m gpu -rs "${GPU_TESTS[@]}"
step gpu-tests-2ranks-staged 120 env MPISPLIT_TEST_COMM=staged "$MPIEXEC" -n 2 "${PYTEST[@]}" --with-mpi -m gpu -rs "${GPU_TESTS[@]}"

# ---- benchmark (before the slower extras, so that its numbers come back whatever happens)
step bench-compute 120 python3 benchmarks/bench_gpu.py --part compute --out "$OUT/bench_gpu.json"
step bench-comm-2ranks 50 "$MPIEXEC" -n 2 python3 benchmarks/bench_gpu.py --part comm --out "$OUT/bench_gpu_comm.json"

step nccl-2ranks-one-gpu 45 "$MPIEXEC" -n 2 python3 benchmarks/bench_gpu.py --part nccl-probe
step gpu-tests-2ranks-auto 75 env MPISPLIT_TEST_COMM=auto "$MPIEXEC" -n 2 "${PYTEST[@]}" --with-mpi -m gpu tests/test_gpu.py

# ---- train.py end to end on the GPU
TRAIN=(train.py --device gpu --layers 2 --hidden 128 --heads 4 --seq-len 64 --batch-size 16 --steps 40
       --eval-every 20 --eval-iters 2 --sample-len 40 --no-progress --log-every 10)
step train-1rank-float32 60 python3 "${TRAIN[@]}" --out /tmp/run_f32
# serving: a real server on the GPU answering streamed greedy completions through httpx, each
# checked for its full token count (tp 1 here; tp 2 sharing the GPU at the end)
step serve-1rank-gpu 60 python3 benchmarks/bench_serve.py --smoke --device gpu --no-peer
# the paged KV cache from the GPU: shared-prefix requests with and without prefix caching, 8 long sequences
step serve-paged-gpu 60 python3 benchmarks/bench_paged.py --smoke --device gpu --no-peer
step train-2ranks-tp2-amp-float16 60 "$MPIEXEC" -n 2 python3 "${TRAIN[@]}" --tp 2 --amp float16 --out /tmp/run_amp
# pipeline stages and sequence parallelism, 2 ranks sharing the GPU on the staged path
step train-2ranks-pp2-staged 60 "$MPIEXEC" -n 2 python3 "${TRAIN[@]}" --tp 1 --pp 2 --micro-batches 2 --comm staged --out /tmp/run_pp2
step train-2ranks-tp2-sp-staged 60 "$MPIEXEC" -n 2 python3 "${TRAIN[@]}" --tp 2 --sequence-parallel --comm staged --out /tmp/run_sp
# the Llama-family decoder (RMSNorm, SwiGLU, rotary, grouped-query attention): a fresh one trained at
# tp 2 with its 2 KV heads split, then at tp 2 with 1 KV head replicated, on the staged path
LLAMA=(--arch llama --kv-heads 2 --intermediate 256)
step train-2ranks-llama-tp2-staged 60 "$MPIEXEC" -n 2 python3 "${TRAIN[@]}" "${LLAMA[@]}" --tp 2 --comm staged --out /tmp/run_llama
step train-2ranks-llama-kv1-sp-staged 60 "$MPIEXEC" -n 2 python3 "${TRAIN[@]}" --arch llama --kv-heads 1 --tp 2 --sequence-parallel --comm staged --out /tmp/run_llama_kv1
# AdamW's state sharded over 2 data-parallel ranks sharing the GPU
step train-2ranks-dp2-shard-optimizer-staged 60 "$MPIEXEC" -n 2 python3 "${TRAIN[@]}" --tp 1 --dp 2 --shard-optimizer --comm staged --out /tmp/run_zero
step serve-2ranks-gpu-staged 60 python3 benchmarks/bench_serve.py --smoke --device gpu --comm staged --no-peer --tp 2
cat /tmp/run_f32/metrics.jsonl /tmp/run_amp/metrics.jsonl /tmp/run_pp2/metrics.jsonl /tmp/run_sp/metrics.jsonl \
    /tmp/run_llama/metrics.jsonl /tmp/run_llama_kv1/metrics.jsonl /tmp/run_zero/metrics.jsonl \
    > "$OUT/train_metrics.jsonl" 2> /dev/null

echo "=== summary (step, exit status, seconds); total $((SECONDS - START))s"
cat "$SUMMARY"
exec 1>&- 2>&-  # let tee write the last lines before the files are collected
wait "$TEE_PID" 2> /dev/null
exit 0
