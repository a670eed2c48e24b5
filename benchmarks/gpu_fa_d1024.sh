#!/usr/bin/env bash
# FA at the largest latent size (D=1024) on a lent GPU, with the batch-shared preconditioner:
# the CUDA-graph tests first, then EM, gradient EM and unrolled (shared preconditioner, I=5)
# in one process, then unrolled with I=10 alone in a second process (its target comes from the
# first process's EM; merge the two with `unrolling.py --merge`).
# `repeat` as the second argument instead runs unrolled (I=5) twice more alone at D=1024 (fresh
# CUDA-generator draws, same data and initialisation: is the first run typical?), then all three
# methods at D=512 (the crossover side).
# Usage: bash benchmarks/gpu_fa_d1024.sh OUTDIR [repeat]   (results under OUTDIR/r)
set -u
out=${1:-/tmp/gpu-fa}/r
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
common=(--device cuda --cuda-graph --epochs 400 --threads 4 --preconditioner shared)

if [ "${2:-}" = repeat ]; then
    for r in 1 2; do
        timeout 85 python3 benchmarks/unrolling.py "${common[@]}" --latent 1024 --epochs 120 \
            --unroll-steps 5 --methods unrolled --budget unrolled=20 --out "$out/rep$r" \
            --note "shared preconditioner, I=5, repeat $r, alone" 2>&1 | grep "| 1024 |"
    done
    timeout 150 python3 benchmarks/unrolling.py "${common[@]}" --latent 512 --unroll-steps 5 \
        --budget em=15 gradient_em=40 unrolled=12 --out "$out/d512" \
        --note "shared preconditioner, I=5, same process" 2>&1 | grep -v "^D=" | tail -n 14
    exit 0
fi

timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_graph.py \
    >"$out/tests.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|FAILED|Error:" "$out/tests.log" | tail -n 8

timeout 330 python3 benchmarks/unrolling.py "${common[@]}" --latent 1024 --unroll-steps 5 \
    --budget em=30 gradient_em=150 unrolled=25 --out "$out/i5" \
    --note "shared preconditioner, I=5, same process" 2>&1 | grep -v "^D=" | tail -n 16

timeout 100 python3 benchmarks/unrolling.py "${common[@]}" --latent 1024 --unroll-steps 10 --methods unrolled \
    --budget unrolled=25 --out "$out/i10" --note "shared preconditioner, I=10, alone" \
    2>&1 | grep -v "^D=" | tail -n 8
