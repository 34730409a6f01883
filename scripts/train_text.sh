#!/usr/bin/env bash
# Reproduces the shipped text-prompted model (mode_ray/pretrained/mnist-text) and its dense baseline on a
# 2-core CPU machine: four experts on the label groups of `mnist`, one of them a cross-attention DiT, trained
# on captions of the labels and of attributes measured on each image ("a thick, left-slanted 7"), read by the
# all-MiniLM-L6-v2 encoder (the `text` extra). The README quotes these commands.
set -euo pipefail
OUT=${OUT:-mode_ray/pretrained/mnist-text}
BASELINES=${BASELINES:-runs/baselines}
STEPS=${STEPS:-2000}
mode-ray train experts --out "$OUT" --partition "labels:8,9|0,6|1,4,7|2,3,5" --backbone dit,unet,unet,unet \
  --preset s --condition text --text-tokens 16 --steps "$STEPS" --batch-size 64 --parallel 2 --workers 1 \
  --cpus-per-worker 1
mode-ray train gate --mixture "$OUT" --steps 1500 --batch-size 128
# Dense text baseline with the same total training FLOPs as the four experts together (= top-2 active params):
mode-ray train dense --out "$BASELINES/dense-text" --preset s2 --condition text --text-tokens 16 \
  --match-compute "$OUT"
# Quality table (README): accuracy per phrasing (seen / unseen), classifier-FID.
mode-ray eval --model "$OUT" --model "$BASELINES/dense-text" --num-samples 500 --prompt-samples 10 \
  --out runs/eval-text
