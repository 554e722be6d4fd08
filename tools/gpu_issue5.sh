#!/usr/bin/env bash
# The remaining accelerator checks of the timing issue, one device call per stage, in this order
# of priority (times estimated from session 1's H100 compile and step times):
#
#   bench (~7 min): anchors and bcjax's step throughput for resnet18, resnet50, mobilenet_v2 and
#         mobilenet_v3_large at per-device batch 32 and 128, bf16, 224 px.      timeout_s=540
#   why   (~5 min): the plain-Flax anchor beside the step ablation of resnet18 and resnet50 at
#         batch 128 (python -m bcjax.benchmark --ablate: is a gap the model's or the step's?).
#                                                                               timeout_s=420
#   e2e   (~3 min): the 100-epoch ResNet-18 run of BUSI's size twice, training images on the
#         device (the default there) and sent from the host, against the issue's 60 s.
#                                                                               timeout_s=300
#
# Prepare here (no device):  bash ../shared/bench/gpu_wheels.sh   (writes .whl/, see ../shared/BENCH.md)
#                            mkdir -p .anchor && cp ../shared/bench/anchor_step.py .anchor/
# Then: run(command="bash tools/gpu_issue5.sh bench", carry=[".whl", ".anchor"], timeout_s=540), and the
# next stage while status leaves enough time. Every stage keeps its full log in $OUT. Copy the
# figures (bench/benchmark.md, ablate/ablation.md, anchors.jsonl, e2e_*.txt) into BUILD_NOTES.md with
# the card and date; give_back.
set -u
stage=${1:-bench}
# SKIP_WHEELS=1 and E2E_EXTRA="--config.x=..." only for a smoke test of this script on a CPU box.
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export BCJAX_CACHE_DIR=/tmp/jaxcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u

e2e_run() {  # $1: input_on_device value
  local wd=/tmp/e2e_$1 t0 t1 rc
  rm -rf "$wd" "/tmp/jaxcache_e2e_$1"  # both runs compile cold, as a first run does
  t0=$(date +%s.%N)
  BCJAX_CACHE_DIR="/tmp/jaxcache_e2e_$1" timeout 140 python3 -m bcjax.main --config=configs/resnet_1dev.py --workdir="$wd" \
    --config.dataset=busi --config.data_dir=/tmp/busi_root --config.input_on_device="$1" ${E2E_EXTRA:-} \
    > "$OUT/e2e_$1.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  python3 -c "print(f'process wall {float($t1) - float($t0):.1f} s, exit code $rc (input_on_device=$1)')"
  grep -E "Test \(|accuracy |training images|Timing|Error|error" "$OUT/e2e_$1.log" | tail -8
  python3 - "$wd" <<'EOF'
import json, sys
wd = sys.argv[1]
t = json.load(open(f"{wd}/timing.json"))
r = json.load(open(f"{wd}/results.json"))
print({"test_acc": r["test"]["accuracy"], "input_on_device": r.get("input_on_device"),
       **{k: t.get(k) for k in ("train_wall_s", "steps_total", "step_time_s", "input_wait_s", "phases_s", "checkpoints_saved")},
       "compile_train_step": t.get("compile", {}).get("train_step")})
EOF
}

case "$stage" in
  bench)
    for b in 128 32; do
      timeout 120 python3 .anchor/anchor_step.py jax $b | tee -a $OUT/anchors.jsonl
      timeout 120 python3 .anchor/anchor_step.py torch $b nocompile | tee -a $OUT/anchors.jsonl
    done
    timeout 300 python3 -m bcjax.benchmark --models resnet18,resnet50,mobilenet_v2,mobilenet_v3_large \
      --batch 32,128 --devices 1 --steps 15 --ring "" --anchors $OUT/anchors.jsonl --out $OUT/bench \
      > $OUT/bench.log 2>&1
    tail -20 $OUT/bench.log ;;
  why)
    timeout 120 python3 .anchor/anchor_step.py jax 128 | tee -a $OUT/anchors.jsonl
    timeout 270 python3 -m bcjax.benchmark --ablate --models resnet18,resnet50 --batch 128 --steps 20 \
      --anchors $OUT/anchors.jsonl --out $OUT/ablate > $OUT/ablate.log 2>&1
    tail -24 $OUT/ablate.log ;;
  e2e)
    timeout 60 python3 -m bcjax.data.synthetic --out /tmp/busi_root > $OUT/synthetic.log 2>&1
    e2e_run auto 2>&1 | tee $OUT/e2e_auto.txt
    e2e_run no 2>&1 | tee $OUT/e2e_no.txt ;;
  *)
    echo "usage: bash tools/gpu_issue5.sh bench|why|e2e" >&2
    exit 2 ;;
esac
