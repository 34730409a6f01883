#!/usr/bin/env bash
# The prepared GPU run (one short call on a lent GPU machine). The device image has torch and safetensors but
# no Ray, so it checks the engine, not the cluster: CUDA vs CPU exactness of the shipped mixture, mixture
# images/s, expert forward rows/s (fp32, bf16) and training steps/s. Needs pydantic wheels in .whl/ (see README).
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/gpu_check.py
