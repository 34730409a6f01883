#!/usr/bin/env bash
# Issue 11 item 5: the shipped experts with 30% condition dropout instead of 10% (same partition, preset, steps and
# batch as scripts/train_default.sh; the shipped gate is reused: it is trained on the data, not on the experts),
# then the unconditional study on it (README: Unconditional samples). About 37 minutes of
# training on 2 cores (two experts at a time).
set -euo pipefail
OUT=${OUT:-runs/mnist-drop30}
mode-ray train experts --out "$OUT" --partition "labels:0,6|1,4,7|2,3,5|8,9" --preset s --steps 2500 \
  --batch-size 64 --parallel 2 --workers 1 --cpus-per-worker 1 --cond-dropout 0.3
cp -r mode_ray/pretrained/mnist/gate "$OUT/"
python - "$OUT/mixture.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["min_weight"] = 0.01  # as shipped
json.dump(m, open(sys.argv[1], "w"), indent=2)
PY
python benchmarks/quality_unconditional.py --model "$OUT" --calibration-n 0 --num-samples 2000 \
  --configs learned-top2,posterior-top2,conditional,experts --out benchmarks/results/quality/unconditional-dropout30
