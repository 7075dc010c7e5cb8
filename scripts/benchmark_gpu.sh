#!/usr/bin/env bash
# The GPU benchmark in one command, for a machine with CUDA and torch but not this project's other pins.
#
# It installs any wheels carried in .wheels/ (without dependencies), puts the checkout on PYTHONPATH and
# runs `vtw-train benchmark` at a real model's shape: every strategy, eager and graphed (batch <= 8),
# prefill and `generate`, tables on stdout and in $OUT (default outputs/benchmark/gpu).
#
# Before going to such a machine, fetch the pure-Python wheels it may lack (versions from constraints.txt):
#   pip download --no-deps -d .wheels transformers==5.23.0 jsonargparse==4.53.0 docstring_parser==0.18.0 \
#       typeshed_client==2.14.0
# Settings (environment): PRESET (llava15_7b), DEVICE (cuda), DTYPE (bfloat16), BATCHES ("[1, 16, 64]"),
# DECODE (64 new tokens), REPEATS (5), LAYERS (the preset's depth). A scaled-down run on a CPU:
#   PRESET=cpu_small DEVICE=cpu DTYPE=float32 BATCHES="[1, 2]" DECODE=2 REPEATS=1 bash scripts/benchmark_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".wheels/*.whl" >/dev/null; then
    python -m pip install --quiet --no-deps .wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-outputs/benchmark/gpu}"
layers=()
if [[ -n "${LAYERS:-}" ]]; then layers=(--num_layers "$LAYERS"); fi
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
python -m vtw_train benchmark --preset "${PRESET:-llava15_7b}" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
    --batch_sizes "${BATCHES:-[1, 16, 64]}" --decode_tokens "${DECODE:-64}" --repeats "${REPEATS:-5}" \
    --graphs true "${layers[@]}" --output_dir "$out"
