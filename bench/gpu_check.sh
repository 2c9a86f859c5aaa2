#!/usr/bin/env bash
# The GPU check, in one script and under 10.5 minutes: environment, GPU tests, the rest of the test suite, the
# conv2d+bias+ReLU benchmark (eager and cnnperf on as many ResNet-50 and VGG-16 shapes as 90 s allow), the
# gradient clip benchmark (torch, loop, cnnperf on ResNet-50, VGG-16 and 1000 tiny tensors), cnnperf profile
# on ResNet-18 and ResNet-50 at batch 128 and 64, then torch.compile for as many ResNet-50 shapes as the time
# left allows.
#
#   bash bench/gpu_check.sh            # from anywhere; runs in the repository root
#
# Assumes torch, triton, pytest and pytest-benchmark are installed (nothing heavy is installed here).
# Writes under $OUT when set, else bench/results/:
#   gpu_check_<device>_<time>.json   device, versions, each step's exit status and duration
#   gpu_check_<device>_<time>.log    everything printed
#   bench_conv_<device>_<time>.json  cnnperf bench record (eager, cnnperf)
#   bench_conv_compile_<device>_<time>.json   cnnperf bench record (eager, compile, cnnperf; ResNet-50)
#   bench_clip_<device>_<time>.json  cnnperf bench-clip record (torch, loop, cnnperf; fp32)
#   profile_<model>_b<batch>_<device>_<time>/   cnnperf profile: profile.json, report.html
# Every step runs under `timeout`, capped by what is left of the total budget; a failing step does not stop
# the others, and the script exits 1 if any step failed or was skipped.

set -u
cd "$(dirname "$0")/.." || exit 2

RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS" || exit 2
BUDGET_S=${GPU_CHECK_BUDGET_S:-600}   # 10 minutes; `timeout --kill-after` may add 10 s to the last step
DEADLINE=$((SECONDS + BUDGET_S))
STAMP=$(date -u +%Y%m%d-%H%M%S)
STEPS=$(mktemp)
STATUS=0
trap 'rm -f "$STEPS"' EXIT

# The GPU's name, file-name safe ("NVIDIA H100 80GB HBM3" -> nvidia-h100-80gb-hbm3), as cnnperf.bench names it.
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
SLUG=$(printf '%s' "${GPU:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
LOG="$RESULTS/gpu_check_${SLUG}_${STAMP}.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

left() { echo $((DEADLINE - SECONDS)); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }  # cap SECONDS: SECONDS or the time left if less

# step NAME MAX_SECONDS COMMAND...: run COMMAND under timeout (MAX_SECONDS or the time left, whichever is
# less), record its exit status, and go on whatever it returns.
step() {
    local name=$1 limit=$2 rc t0
    shift 2
    if (($(left) < 20)); then
        echo "=== $name: skipped, $(left) s of the budget left"
        printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$STEPS"
        STATUS=1
        return 0
    fi
    limit=$(cap "$limit")
    echo "=== $name (timeout ${limit} s): ${*@Q}"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    ((rc == 124 || rc == 137)) && echo "=== $name: TIMED OUT after ${limit} s"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
    ((rc != 0)) && STATUS=1
    return 0
}

step nvidia-smi 20 nvidia-smi
# cnnperf.kernels is mapped from the top-level kernels/ directory by the package metadata, so PYTHONPATH
# alone cannot import it: an editable install (no dependencies, no network, no build environment) can.
# A setuptools older than 70.1 cannot build without the `wheel` package; then try an isolated build, which
# works where pip can reach an index or a wheel directory.
step install 90 bash -c 'python -m pip install --quiet --no-index --no-deps --no-build-isolation -e . ||
    python -m pip install --quiet --no-deps -e .'
step import 60 python -c 'import cnnperf, cnnperf.bench, cnnperf.kernels.conv_bias_relu as k
print("cnnperf", cnnperf.__version__, "kernels from", k.__file__)'
step gpu-tests 150 python -m pytest -q -p no:cacheprovider tests -m "gpu or kernels"
step other-tests 60 python -m pytest -q -p no:cacheprovider tests -m "not gpu and not kernels"
# The benchmark stops starting new shapes 20 s before its timeout, so it ends with a complete JSON record of
# what it measured instead of being killed (the record is rewritten after every shape in any case).
BENCH_S=$(cap 90)
step bench "$BENCH_S" python -m cnnperf bench --model all --pass all --no-compile \
    --time-budget $((BENCH_S > 40 ? BENCH_S - 20 : 20)) --out "$RESULTS/bench_conv_${SLUG}_${STAMP}.json"
# The fused gradient norm + clip against torch's clip_grad_norm_ (foreach) and a per-parameter loop, fp32; the
# record is rewritten after every case, so a timeout still leaves the cases it finished.
step bench-clip 60 python -m cnnperf bench-clip --case all --out "$RESULTS/bench_clip_${SLUG}_${STAMP}.json"
# cnnperf profile on torchvision ResNet-18 and ResNet-50 (CIFAR-shaped data, Adam): every GPU option at batch
# 128 (torch.compile default mode included, max-autotune left out: minutes per model) with the batch-size sweep;
# no compile and no sweep at batch 64. Each run stops starting variants at its --budget, writes its record
# folder and goes on.
for MODEL in resnet18 resnet50; do
    step "profile-$MODEL-128" 100 python -m cnnperf profile --model "$MODEL" --data fake --batch-size 128 \
        --variants tf32,bf16,fp16,channels_last,cudnn_benchmark,fuse,compile --budget 70 \
        --out "$RESULTS/profile_${MODEL}_b128_${SLUG}_${STAMP}"
    step "profile-$MODEL-64" 45 python -m cnnperf profile --model "$MODEL" --data fake --batch-size 64 \
        --variants tf32,bf16,fp16,channels_last,cudnn_benchmark,fuse --budget 30 --batch-sizes none \
        --out "$RESULTS/profile_${MODEL}_b64_${SLUG}_${STAMP}"
done
# torch.compile with max-autotune tunes every shape for tens of seconds: ResNet-50 only, as far as time allows.
COMPILE_S=$(($(left) - 15))
step bench-compile "$COMPILE_S" python -m cnnperf bench --model resnet50 --pass all \
    --variants eager,compile,cnnperf --time-budget $((COMPILE_S > 80 ? COMPILE_S - 60 : 20)) \
    --out "$RESULTS/bench_conv_compile_${SLUG}_${STAMP}.json"

# The record of this check: device, versions, steps. Written by Python (json module), atomically.
python - "$RESULTS/gpu_check_${SLUG}_${STAMP}.json" "$STEPS" "$STATUS" "$SECONDS" "$DRIVER" <<'EOF' || STATUS=1
import datetime, json, os, sys

import torch

path, steps_file, status, seconds, driver = sys.argv[1:]
try:
    from cnnperf import bench
    versions = bench.versions()
except Exception as e:  # the install step failed: still record what can be
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "error": repr(e)}
steps = []
for line in open(steps_file):
    name, rc, secs = line.rstrip("\n").split("\t")
    steps.append({"step": name, "exit": rc if rc == "skipped" else int(rc), "seconds": int(secs)})
record = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "driver": driver or None,
    "versions": versions,
    "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "status": int(status), "seconds": int(seconds), "steps": steps,
}
tmp = f"{path}.{os.getpid()}.tmp"
with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
os.replace(tmp, path)
print(json.dumps(record, indent=1))
EOF

echo "=== gpu_check: status $STATUS after $SECONDS s; results in $RESULTS"
exec 1>&- 2>&-  # end of output: tee sees end-of-file, finishes the log, and exits
wait "$TEE_PID" 2>/dev/null
exit "$STATUS"
