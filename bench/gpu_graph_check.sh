#!/usr/bin/env bash
# GPU checks of the graph-captured train step (issue 15, part 3 and the train rows of part 4).
# Run from the repository root on a CUDA machine:  bash bench/gpu_graph_check.sh [OUT_DIR]
#   1. the GPU tests of the captured step and of the trainer (graph == eager, NaN skip, exact resume)
#   2. a 200-step GPT-2 run of the trainer on the embedded corpus (B16 x T1024, bf16, the default path);
#      its "throughput:" line gives tokens/s over the train steps, evaluations and checkpoints excluded
#   3. the train bench rows to compare with: triton (graph, the default path), triton-nograph, torch+compile
set -uo pipefail
OUT="${1:-$(mktemp -d /tmp/gptcore-graph-XXXX)}"
mkdir -p "$OUT"
echo "== GPU tests" | tee "$OUT/tests.log"
python -m pytest -q -m gpu tests/test_graph_step.py tests/test_train.py 2>&1 | tee -a "$OUT/tests.log"
echo "== 200-step GPT-2 trainer run" | tee "$OUT/train.log"
python -m gptcore.train --preset gpt2 --dtype bf16 --batch-size 16 --lr 6e-4 --max-steps 200 \
    --eval-interval 0 --eval-steps 1 --ckpt-interval 0 --sample-tokens 0 --no-progress --log-interval 20 \
    --out-dir "$OUT/gpt2-200" 2>&1 | tee -a "$OUT/train.log"
echo "== train bench (same shape)" | tee "$OUT/bench.log"
python -m bench train --configs triton,triton-nograph,torch+compile --no-context-search --out "$OUT/bench" \
    2>&1 | tee -a "$OUT/bench.log"
echo
grep -h "cuda graph:\|^throughput:" "$OUT/train.log"
grep -h "train target" "$OUT/bench.log"
echo "logs and JSON: $OUT"
