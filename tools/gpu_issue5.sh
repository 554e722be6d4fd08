#!/usr/bin/env bash
# The remaining accelerator checks of the timing issue, as at most two device calls.
#
#   bench (~6-8 min on an H100): anchors and bcjax's step throughput for resnet18, resnet50,
#         mobilenet_v2 and mobilenet_v3_large at per-device batch 32 and 128, bf16, 224 px.
#   why   (~5 min): the plain-Flax anchor beside the step ablation of resnet18 and resnet50 at
#         batch 128 (python -m bcjax.benchmark --ablate: where bcjax's step differs from the
#         anchor's), then the 100-epoch ResNet-18 run of BUSI's size end to end.
#
# Prepare here (no device):  bash ../shared/bench/gpu_wheels.sh   (writes .whl/, see ../shared/BENCH.md)
#                            mkdir -p .anchor && cp ../shared/bench/anchor_step.py .anchor/
# Then: run(command="bash tools/gpu_issue5.sh bench", carry=[".whl", ".anchor"], timeout_s=540)
# and, if status still leaves >= 6 min: run(command="bash tools/gpu_issue5.sh why", ..., timeout_s=400).
# Copy $OUT/bench/*.md, $OUT/ablate/ablation.md, anchors.jsonl and e2e.txt figures into
# BUILD_NOTES.md with the card and date; give_back.
set -u
stage=${1:-bench}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export BCJAX_CACHE_DIR=/tmp/jaxcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u

if [ "$stage" = bench ]; then
  for b in 128 32; do
    timeout 60 python3 .anchor/anchor_step.py jax $b | tee -a $OUT/anchors.jsonl
    timeout 90 python3 .anchor/anchor_step.py torch $b nocompile | tee -a $OUT/anchors.jsonl
  done
  timeout 300 python3 -m bcjax.benchmark --models resnet18,resnet50,mobilenet_v2,mobilenet_v3_large \
    --batch 32,128 --devices 1 --steps 15 --ring "" --anchors $OUT/anchors.jsonl --out $OUT/bench 2>&1 | tail -20
elif [ "$stage" = why ]; then
  timeout 60 python3 .anchor/anchor_step.py jax 128 | tee -a $OUT/anchors.jsonl
  timeout 240 python3 -m bcjax.benchmark --ablate --models resnet18,resnet50 --batch 128 --steps 20 \
    --anchors $OUT/anchors.jsonl --out $OUT/ablate 2>&1 | tail -24
  # End to end: the issue's 60 s target for a 100-epoch ResNet-18 run of BUSI's size.
  python3 -m bcjax.data.synthetic --out /tmp/busi_root >/dev/null 2>&1
  /usr/bin/time -f "process wall %e s" timeout 150 python3 -m bcjax.main --config=configs/resnet_1dev.py \
    --workdir=/tmp/e2e --config.dataset=busi --config.data_dir=/tmp/busi_root 2>&1 \
    | grep -E "Test|accuracy|wall|compile|epoch 100|Error|error" | tail -12 | tee $OUT/e2e.txt
  python3 - <<'EOF' | tee -a $OUT/e2e.txt
import json
t = json.load(open("/tmp/e2e/timing.json"))
print({k: t.get(k) for k in ("train_wall_s", "steps_total", "step_time_s", "input_wait_s", "compile", "phases_s")})
EOF
else
  echo "usage: bash tools/gpu_issue5.sh bench|why" >&2
  exit 2
fi
