#!/usr/bin/env bash
# The SBL dictionary checks still owed to a GPU (issue 4), sized for one device call:
# the gpu-marked tests (the SBL dictionary CUDA-graph tests have never run on a GPU), then
# held-out sparse Bayesian dictionary learning at 32×32 patches (N=1024) and 2048 atoms, all
# three methods in one process, held-out α refitted at each monitor (--heldout-refit: tracked
# α understate the held-out value, README), unrolled replayed as a CUDA graph when its graph
# tests passed.
# Usage: bash benchmarks/gpu_sbl_heldout.sh OUTDIR [DEVICE]   (results under OUTDIR/r)
# DEVICE defaults to cuda; "cpu" runs a seconds-long smoke version of the same commands.
set -u
out=${1:-/tmp/gpu-sbl}/r
device=${2:-cuda}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"

if [ "$device" = cuda ]; then
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests >"$out/tests.log" 2>&1
    echo "pytest rc=$?"
    grep -E "passed|failed|FAILED|Error:" "$out/tests.log" | tail -n 12
    graph="--cuda-graph unrolled"
    if grep -q "FAILED.*sbl_dictionary" "$out/tests.log"; then graph=""; fi
    sizes=(--patch 32 --n-signals 1024 --atoms 2048 --heldout 64 --heldout-refit 50
        --monitor-every 10 --budget em=60 gradient_em=90 unrolled=45)
else
    graph=""
    sizes=(--patch 8 --n-signals 64 --atoms 32 --heldout 8 --heldout-refit 5
        --monitor-every 2 --budget em=2 gradient_em=2 unrolled=2)
fi
echo "graph flag: '$graph'"
timeout 420 python3 benchmarks/sbl_dictionary.py --device "$device" $graph "${sizes[@]}" \
    --epochs 5000 --em-iter 5000 --lr 0.1 --lr-decay 0.995 --alpha-step 0.25 --threads 4 --out "$out/sbl" \
    --note "held-out, one process, alpha step 0.25 for all methods" 2>&1 | tail -n 14
