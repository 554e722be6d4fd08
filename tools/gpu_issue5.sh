#!/usr/bin/env bash
# The remaining accelerator check of the timing issue, as ONE device call (~6-8 min on an H100):
# anchors and bcjax's step throughput for resnet18, resnet50, mobilenet_v2 and
# mobilenet_v3_large at per-device batch 32 and 128, bf16, 224 px, in the same call.
#
# Prepare here (no device):  bash ../shared/bench/gpu_wheels.sh   (writes .whl/, see ../shared/BENCH.md)
#                            mkdir -p .anchor && cp ../shared/bench/anchor_step.py .anchor/
# Then: run(command="bash tools/gpu_issue5.sh", carry=[".whl", ".anchor"], timeout_s=540)
# and copy $OUT/bench/*.md and anchors.jsonl figures into BUILD_NOTES.md with the card and date.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export BCJAX_CACHE_DIR=/tmp/jaxcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for b in 128 32; do
  timeout 60 python3 .anchor/anchor_step.py jax $b | tee -a $OUT/anchors.jsonl
  timeout 90 python3 .anchor/anchor_step.py torch $b nocompile | tee -a $OUT/anchors.jsonl
done
timeout 300 python3 -m bcjax.benchmark --models resnet18,resnet50,mobilenet_v2,mobilenet_v3_large \
  --batch 32,128 --devices 1 --steps 15 --ring "" --anchors $OUT/anchors.jsonl --out $OUT/bench 2>&1 | tail -20
