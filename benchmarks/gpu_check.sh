#!/usr/bin/env bash
# GPU check in at most 8 minutes on one GPU: joint pretraining at the GPU recipe (bf16 autocast,
# torch.compile off and on, 300 steps each), one fine-tuning run (300 steps, predict + score),
# with items/s, GPU busy % (nvidia-smi), peak GPU memory and the share of step time spent waiting
# for data per phase. The work is done by benchmarks/gpu_check.py (see its docstring); this
# wrapper adds the CUDA gate and the time limit.
#
#   bash benchmarks/gpu_check.sh --require-cuda        # on a GPU machine (the intended use)
#   bash benchmarks/gpu_check.sh --device cpu          # tiny CPU smoke run of the same driver
#   bash benchmarks/gpu_check.sh --steps 100 ...       # other options go to gpu_check.py
#
# Without CUDA it never skips silently: with --require-cuda it exits 2 with one line on stderr
# (within seconds: only torch is imported), without it 3 ("CUDA is not available: nothing
# measured"), unless --device cpu asks for the smoke run. PYTHON overrides the interpreter;
# GPU_CHECK_LIMIT_S the time limit (default 480 s; exit 124 when it is reached).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${PYTHON:-python}"
limit="${GPU_CHECK_LIMIT_S:-480}"
require=0
cpu=0
for arg in "$@"; do
    case "$arg" in
        --require-cuda) require=1 ;;
        --device=cpu) cpu=1 ;;
    esac
done
prev=""
for arg in "$@"; do
    if [ "$prev" = "--device" ] && [ "$arg" = "cpu" ]; then cpu=1; fi
    prev="$arg"
done

# the gate: import torch only (a few seconds), so a machine without CUDA fails within a minute
if ! cuda="$(timeout 50 "$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)"; then
    echo "gpu_check: FAILED: '$python -c \"import torch\"' did not run (is the medclust environment active?)" >&2
    exit 2
fi
if [ "$cuda" != "1" ]; then
    if [ "$require" = 1 ]; then
        echo "gpu_check: FAILED: --require-cuda but torch sees no CUDA device (torch.cuda.is_available() is False)" >&2
        exit 2
    fi
    if [ "$cpu" != 1 ]; then
        echo "gpu_check: CUDA is not available: nothing measured (this is a GPU check; --device cpu runs a tiny CPU smoke test)" >&2
        exit 3
    fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 "$limit" "$python" -u benchmarks/gpu_check.py "$@"
