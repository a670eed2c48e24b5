#!/usr/bin/env bash
# GPU checks on a lent device machine (its python3 already holds torch), in priority order,
# each under its own time limit: the gpu-marked tests; the per-epoch cost of gradient EM and
# unrolled FA, eager and replayed as CUDA graphs; FA time to target at D=512 and 1024 with CUDA
# graphs (the benchmark's defaults: shared preconditioner, I=5); sparse Bayesian dictionary
# learning at 4096 atoms (warm-started unrolled), replayed as CUDA graphs when its graph tests
# passed.
# Usage: bash benchmarks/gpu_check.sh OUTDIR   (results under OUTDIR/r)
set -u
out=${1:-/tmp/gpu-check}/r
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"

timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests >"$out/tests.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|FAILED|Error:" "$out/tests.log" | tail -n 12
graph="gradient_em unrolled"  # replay gradient EM too only if its capture test passed
if grep -q "FAILED.*gradient_em" "$out/tests.log"; then graph="unrolled"; fi
echo "CUDA graphs for: $graph"
sbl_graph="--cuda-graph"  # SBL dictionary learning: graphs only if all its graph tests passed
if grep -q "FAILED.*sbl_dictionary" "$out/tests.log"; then sbl_graph=""; fi
echo "SBL dictionary learning graph flag: '$sbl_graph'"

timeout 150 python3 benchmarks/unrolling_epoch_cost.py --device cuda --cuda-graph $graph \
    --latent 256 512 1024 --budgets 1x10 --n-train 8192 --out "$out" 2>&1 | tail -n 7

timeout 250 python3 benchmarks/unrolling.py --device cuda --cuda-graph $graph \
    --latent 512 1024 --budget em=15 gradient_em=40 unrolled=20 --epochs 150 --threads 4 \
    --out "$out/fa" --note "same process" 2>&1 | grep -v "^D=" | tail -n 22

timeout 170 python3 benchmarks/sbl_dictionary.py --device cuda $sbl_graph --patch 32 \
    --n-signals 4096 --atoms 4096 --lr 0.03 --max-seconds 35 --threads 4 --out "$out/sbl" \
    --note "warm-started unrolled, same process" 2>&1 | tail -n 12
