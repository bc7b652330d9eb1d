#!/usr/bin/env bash
# The GPU check, sized for a short loan (under 8 minutes on one GPU):
#   1. the CUDA-marked tests (int4 packing and kernel vs the float64 dequantized matmul, compiled
#      decode with CUDA graphs, speculative decoding on CUDA);
#   2. `runner bench` on a Llama-2-7B-shaped random model (every layer the 7B shape; 8 of its 32
#      layers, so the random checkpoint is written in seconds) in bf16, int8 and int4, with GB/s
#      against the card's measured read bandwidth (--roofline).
# It writes $OUT/gpu-{none,int8,int4}.json (the bench figures) and $OUT/summary.txt. On a machine without CUDA it
# stops at once with exit 2.
#
#   bash benchmarks/gpu.sh            # OUT defaults to benchmarks/results/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device visible (torch.cuda.is_available() is False); this check needs a GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
export RUNNER_HOME=${RUNNER_HOME:-$OUT/home}
{
    echo "# GPU check $(date -u +%FT%TZ)"
    python -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| GPUs', torch.cuda.device_count())"
} > "$OUT/summary.txt"

echo "## CUDA tests" >> "$OUT/summary.txt"
timeout 150 python -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/cuda-tests.txt" | tail -3 \
    >> "$OUT/summary.txt" || true

echo "## bench: Llama-2-7B-shaped, 8 layers, random weights" >> "$OUT/summary.txt"
SHAPE=(model.spec=llama-2-7b "model.checkpoint=$RUNNER_HOME/llama-2-7b-8l/model.pth" model.source=random:0
       model.arch.n_layers=8 device=cuda dtype=bfloat16)
# The first bench also writes the random checkpoint (about 7.5 GB in fp32): it gets more time.
for QUANT in "quant.mode=none" "quant.mode=int8" "quant.mode=int4 quant.groupsize=128"; do
    name=$(echo "$QUANT" | cut -d' ' -f1 | cut -d= -f2)
    limit=$([ "$name" = none ] && echo 150 || echo 75)
    # shellcheck disable=SC2086  # QUANT is two words for int4
    timeout "$limit" runner bench recipes/tiny-random.yaml "${SHAPE[@]}" $QUANT --tokens 128 --runs 3 --roofline \
        --json "$OUT/gpu-$name.json" 2>&1 | tail -1 >> "$OUT/summary.txt" || echo "bench $name failed" >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
