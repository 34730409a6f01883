#!/usr/bin/env bash
# Reproduces the shipped default model (mode_ray/pretrained/mnist) and its baselines on a 2-core CPU machine.
# Every step is a Ray Train job started by the project's own CLI; the README quotes these commands.
set -euo pipefail
OUT=${OUT:-mode_ray/pretrained/mnist}
PRETRAINED=${PRETRAINED:-mode_ray/pretrained}
STEPS=${STEPS:-2500}
mode-ray train experts --out "$OUT" --partition "labels:0,6|1,4,7|2,3,5|8,9" --preset s --steps "$STEPS" \
  --batch-size 64 --parallel 2 --workers 1 --cpus-per-worker 1
# The gate: features on a 4x4 grid, null-condition rows fitted to the empirical posterior (README: Unconditional)
mode-ray train gate --mixture "$OUT" --head spatial --targets posterior --steps 4000 --batch-size 128
mode-ray train classifier --out "$OUT/classifier" --steps 1500 --batch-size 128
# The shipped dense baselines, each with the same total training FLOPs as the four experts together
# (s = one expert's size = top-1 active params, s2 ~ top-2 active, m ~ total params); one core each:
for p in s s2 m; do
  mode-ray train dense --out "$PRETRAINED/mnist-dense-$p" --preset $p --match-compute "$OUT" \
    --cpus-per-worker 1 --num-cpus 1
done
# Quality table (README): both guidance settings, 1000 samples per model.
mode-ray eval --model "$OUT" --model mnist-dense-s2 --model mnist-dense-m --num-samples 1000 --out runs/eval
mode-ray eval --model "$OUT" --model mnist-dense-s2 --model mnist-dense-m --num-samples 1000 \
  --guidance-scale 1.0 --out runs/eval-g1
# The Pareto chart (README: specialisation against dense at equal compute):
python benchmarks/quality_pareto.py --val-n 200 --test-n 1000 --guidance 1,2,3
