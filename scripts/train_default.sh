#!/usr/bin/env bash
# Reproduces the shipped default model (mode_ray/pretrained/mnist) and its baselines on a 2-core CPU machine.
# Every step is a Ray Train job started by the project's own CLI; the README quotes these commands.
set -euo pipefail
OUT=${OUT:-mode_ray/pretrained/mnist}
BASELINES=${BASELINES:-runs/baselines}
STEPS=${STEPS:-2500}
mode-ray train experts --out "$OUT" --partition "labels:0,6|1,4,7|2,3,5|8,9" --preset s --steps "$STEPS" \
  --batch-size 64 --parallel 2 --workers 1 --cpus-per-worker 1
# The gate: features on a 4x4 grid, null-condition rows fitted to the empirical posterior (README: Unconditional)
mode-ray train gate --mixture "$OUT" --head spatial --targets posterior --steps 4000 --batch-size 128
mode-ray train classifier --out "$OUT/classifier" --steps 1500 --batch-size 128
# Dense baselines with the same total training FLOPs as the four experts together:
mode-ray train dense --out "$BASELINES/dense-active" --preset s2 --match-compute "$OUT"  # = top-2 active params
mode-ray train dense --out "$BASELINES/dense-total" --preset m --match-compute "$OUT"    # = total params
# Quality table (README): both guidance settings, 1000 samples per model.
mode-ray eval --model "$OUT" --model "$BASELINES/dense-active" --model "$BASELINES/dense-total" \
  --num-samples 1000 --out runs/eval
mode-ray eval --model "$OUT" --model "$BASELINES/dense-active" --model "$BASELINES/dense-total" \
  --num-samples 1000 --guidance-scale 1.0 --out runs/eval-g1
