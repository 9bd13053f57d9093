#!/usr/bin/env bash
# Every GPU figure of the accelerator path in one run (about 8 minutes on one H100, data included):
#   1. `synthetic_patients/large` prepared (224x224 images, 512-token notes, 12-lead 500 Hz ECGs);
#   2. the train step of experiments/large.py (~100M parameters) in bfloat16, with and without
#      rematerialization, and in float32: step time, MFU (model FLOPs, no recompute counted), memory,
#      and the input pipeline's share of the training loop's step (goal: >= 40% MFU, < 5% input);
#   3. a short fusion scaling sweep on the accelerator grid (`--full`, a few fusions).
# Results: one JSON line per run in $OUT/large_step.jsonl, the sweep in $OUT/fusion_scaling/.
#
# On the project's lent GPU machine, after `bash ../shared/tools/gpu-wheels.sh pillow filelock pyyaml cloudpickle
# humanize portpicker prometheus-client etils` on the project's machine (what the train-step path imports beyond
# the wheel script's list, in case the image lacks it; without matplotlib the sweep writes no plots):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/* \
#     && export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_large.sh
# Anywhere else with a GPU and `pip install -e .`: bash benchmarks/gpu_large.sh
# A dry run of the script on a CPU, at the smoke variant's width:
#   ARG=smoke, STEPS=2 SCALING_FUSIONS=concat SCALING_MINUTES=0.5 bash benchmarks/gpu_large.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
export MMJAX_DATA_DIR=${MMJAX_DATA_DIR:-/tmp/mmjax_data}
STEPS=${STEPS:-20}
ARG=${ARG:-}  # arguments before the variant's, e.g. "smoke,"
mkdir -p "$OUT"
python3 -c "import jax; print('devices:', jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
time python3 -c "from mmjax.data import sources; sources.load_builder('synthetic_patients/large')"
for variant in "" "remat" "float32"; do
  config="experiments/large.py:${ARG}${variant}"
  log="$OUT/step_${variant:-bf16}.log"
  echo "== $config"
  # a failure (out of memory, a timeout) is a line of the results, and the next variant runs
  set +e
  timeout 300 python3 -m mmjax.benchmarks.train_step --config="$config" --steps="$STEPS" > "$log" 2>&1
  status=$?
  set -e
  if [ "$status" -eq 0 ]; then
    grep '^{' "$log" | tail -n 1 | tee -a "$OUT/large_step.jsonl"
  else
    tail -n 5 "$log"
    echo "{\"config\": \"$config\", \"error\": \"exit status $status, see $log\"}" | tee -a "$OUT/large_step.jsonl"
  fi
done
python3 -m mmjax.benchmarks.fusion_scaling --full --out="$OUT/fusion_scaling" --max_minutes="${SCALING_MINUTES:-4}" \
  --fusions="${SCALING_FUSIONS:-cross_attention,bottleneck,perceiver,concat}" --repeats=5 > "$OUT/scaling.log" 2>&1 \
  || echo "fusion_scaling failed: see $OUT/scaling.log"
tail -n 40 "$OUT/scaling.log"
ls -R "$OUT"
