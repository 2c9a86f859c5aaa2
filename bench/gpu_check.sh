#!/usr/bin/env bash
# The GPU check: one script, its steps ordered by what their results are worth, each under its own time cap,
# under 8 minutes in all (GPU_CHECK_BUDGET_S, default 470 s), so that a rerun fits in the same 15-minute lease.
#
#   bash bench/gpu_check.sh                    # on the GPU machine: results under $OUT, else bench/results/
#   bash bench/gpu_check.sh --rehearse         # on a CPU: every step at tiny sizes (the interpreter for the
#                                              # kernels); fails for every reason that is not the GPU itself
#   bash bench/gpu_check.sh --steps bench-conv,bench-clip   # a rerun: env, install, import, then only these
#   bash bench/gpu_check.sh --rehearse --no-install ...     # cnnperf is already installed in $PYTHON (tests)
#
# Steps (set-up first, then by value):
#   env, install, import   versions and the device; `pip install -e . --no-deps --no-index --no-build-isolation`
#                          (nothing can be downloaded there); import cnnperf and its kernels (and find CUDA)
#   kernel-tests           every kernel against float64 on the GPU: fwd + all gradients, fp32/fp16/bf16, every
#                          config of every list, the shape cases, the autotuned path, grad norm + clip
#   bench-conv             the fused conv (--backend triton: our kernels themselves) against eager cuDNN on
#                          ResNet-50 and VGG-16 shapes, bf16, fwd and fwd+bwd
#   train-step             ResNet-50 training steps (bf16, channels_last, batch 64): the fused Conv-BN-ReLU blocks
#                          (cnnperf.fuse) against eager cuDNN + BatchNorm and torch.compile, interleaved rounds
#   bench-clip             cnnperf.clip_grad_norm_ against torch's foreach clip and a loop; the clip folded into a
#                          fused AdamW step against clip-then-step and the step alone
#   profile-resnet50       cnnperf profile, ResNet-50 at batch 128, every GPU option incl. torch.compile
#   other-tests            the rest of the test suite, on the GPU machine's stack with CUDA visible
#   doctor                 cnnperf doctor on the GPU, 2 epochs
#   profile-resnet18       cnnperf profile, ResNet-18 at batch 128, with the batch-size sweep
#   bench-compile          the conv benchmark with torch.compile (max-autotune) on a few ResNet-50 shapes
#
# Python: $PYTHON, else python3 (on the GPU machine python3 is the one with torch). Nothing is installed but
# cnnperf itself. Output, three files (the device tool brings back at most 8):
#   gpu_check_<device>_<time>.tar.gz   the run folder gpu_check_<device>_<time>/: gpu_check.json, gpu_check.log,
#                                      env.json, pip.txt, tests_*.xml (JUnit), bench_*.json,
#                                      profile_*/ and doctor/ (their JSON and HTML reports)
#   gpu_check_<device>_<time>.json     the record of the run (also in the archive): machine, each step's
#                                      exit status, duration and cap
#   gpu_check_<device>_<time>.log      everything printed (also in the archive)
# The archive, the record and the log are rewritten after every step: a run cut short brings back what it did.
# Unpack into the repository (bench/results/README.md):  tar -xzf DIR/gpu_check_*.tar.gz -C bench/results/
#
# Exit status: 0 when every step passed and the output is within the device tool's limits, 1 otherwise (a step
# failed, timed out or was skipped for lack of time), 2 on a usage error.

set -u
cd "$(dirname "$0")/.." || exit 2

STEPS_KNOWN=(kernel-tests bench-conv train-step bench-clip profile-resnet50 other-tests doctor profile-resnet18 bench-compile)
MODE=gpu
ONLY=""
INSTALL=1
while (($#)); do
    case $1 in
        --rehearse) MODE=rehearsal ;;
        --no-install) INSTALL=0 ;;
        --steps)
            [[ -n ${2:-} && ${2:0:1} != - ]] || { echo "gpu_check.sh: --steps needs a comma list of steps" >&2; exit 2; }
            ONLY=$2
            shift ;;
        --steps=*) ONLY=${1#*=} ;;
        -h | --help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for s in ${ONLY//,/ }; do
    [[ " ${STEPS_KNOWN[*]} " == *" $s "* ]] || {
        echo "gpu_check.sh: --steps: unknown step '$s'; the steps are: ${STEPS_KNOWN[*]}" >&2
        exit 2
    }
done
rehearsing() { [[ $MODE == rehearsal ]]; }

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a step killed at its cap still has everything it printed in the log
command -v "$PY" >/dev/null || { echo "gpu_check.sh: no Python at '$PY' (set PYTHON)" >&2; exit 2; }
BUDGET_S=${GPU_CHECK_BUDGET_S:-$(rehearsing && echo 900 || echo 470)}
DEADLINE=$((SECONDS + BUDGET_S))
STAMP=$(date -u +%Y%m%d-%H%M%S)
if rehearsing; then
    SLUG=rehearsal-cpu
    RESULTS=${OUT:-$(mktemp -d)}
else
    # The GPU's name, file-name safe ("NVIDIA H200" -> nvidia-h200), as cnnperf._env.device_slug names it.
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    SLUG=$(printf '%s' "${GPU:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' |
        sed 's/^-*//; s/-*$//')
    RESULTS=${OUT:-bench/results}
fi
NAME=gpu_check_${SLUG}_${STAMP}
mkdir -p "$RESULTS" || exit 2
STAGE=$(mktemp -d) || exit 2
RUN=$STAGE/$NAME  # the run folder, archived after every step
mkdir -p "$RUN"
STEPS=$STAGE/steps.tsv
LOG=$STAGE/gpu_check.log
: >"$STEPS"
STATUS=0
trap 'rm -rf "$STAGE"' EXIT
exec 3>&1 4>&2 > >(tee -a "$LOG") 2>&1
TEE_PID=$!
echo "=== gpu_check ($MODE): $NAME, budget ${BUDGET_S} s, Python $PY, results in $RESULTS"

left() { echo $((DEADLINE - SECONDS)); }

# Copy the log in, write the record, and put archive, record and log under $RESULTS (each by a rename).
publish() {
    cp "$LOG" "$RUN/gpu_check.log"
    "$PY" bench/gpu_check_record.py record "$RUN" "$STEPS" "$STATUS" "$SECONDS" "$MODE" >/dev/null ||
        echo "=== gpu_check: could not write gpu_check.json"
    tar -czf "$RESULTS/.$NAME.tar.gz.part" -C "$STAGE" "$NAME" &&
        mv -f "$RESULTS/.$NAME.tar.gz.part" "$RESULTS/$NAME.tar.gz"
    cp "$RUN/gpu_check.json" "$RESULTS/.$NAME.json.part" 2>/dev/null &&
        mv -f "$RESULTS/.$NAME.json.part" "$RESULTS/$NAME.json"
    cp "$RUN/gpu_check.log" "$RESULTS/.$NAME.log.part" && mv -f "$RESULTS/.$NAME.log.part" "$RESULTS/$NAME.log"
}

# step NAME GPU_CAP REHEARSAL_CAP COMMAND...: run COMMAND under `timeout` (the cap of this mode, or the time
# left if less), record its exit status, publish, and go on whatever it returned. At its cap a step gets SIGINT
# (Ctrl-C: pytest writes its JUnit record, the tools write what they measured), then KILL_GRACE_S more before
# SIGKILL; the grace counts against the budget. A step not named in --steps is left out (set-up steps always run).
KILL_GRACE_S=15
step() {
    local name=$1 limit=$2 rc t0
    rehearsing && limit=$3
    shift 3
    if [[ -n $ONLY && " ${STEPS_KNOWN[*]} " == *" $name "* && ",$ONLY," != *",$name,"* ]]; then
        return 0
    fi
    if (($(left) - KILL_GRACE_S < 20)); then
        echo "=== $name: skipped, $(left) s of the budget left"
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$STEPS"
        STATUS=1
        publish
        return 0
    fi
    ((limit > $(left) - KILL_GRACE_S)) && limit=$(($(left) - KILL_GRACE_S))
    echo "=== $name (cap ${limit} s, then ${KILL_GRACE_S} s to stop): ${*@Q}"
    t0=$SECONDS
    timeout --signal=INT --kill-after="$KILL_GRACE_S" "$limit" "$@"
    rc=$?
    ((rc == 124 || rc == 137)) && echo "=== $name: TIMED OUT after ${limit} s"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$STEPS"
    ((rc != 0)) && STATUS=1
    publish
    return 0
}

# What the rehearsal adds to each command: the same arguments as the GPU run (so that every one of them is
# parsed), then the tiny sizes, which override them (argparse keeps the last value).
if rehearsing; then
    PYTEST_JOBS=2
    KERNEL_TESTS_R=(-k "3x3_pad1 or (test_every_config and fwd-64x64x32) or test_many_tiny_tensors")
    OTHER_TESTS_R=(-k "test_without_nvtx or test_help")
    BENCH_R=(--device cpu --quick --limit 1 --backend reference --time-budget 20)
    CLIP_R=(--device cpu --quick --case tiny --repeat 3)
    PROFILE_R=(--device cpu --batch-size 2 --steps 2 --warmup 1 --budget 5 --batch-sizes none)
    DOCTOR_R=(--device cpu --epochs 1)
    TRAIN_R=(--device cpu --models resnet18 --image-size 32 --batch-size 2 --rounds 2 --block-steps 1
             --variants eager,fused)
else
    PYTEST_JOBS=8
    KERNEL_TESTS_R=() OTHER_TESTS_R=() BENCH_R=() CLIP_R=() PROFILE_R=() DOCTOR_R=() TRAIN_R=()
fi

step env 20 30 "$PY" - "$RUN" "$MODE" <<'EOF'
import json, os, platform, subprocess, sys
run, mode = sys.argv[1:]
env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
for name in ("torch", "triton", "torchvision", "numpy", "nvtx", "pytest", "xdist"):
    try:
        env[name] = getattr(__import__(name), "__version__", "installed")
    except ImportError:
        env[name] = None
import torch
env["cuda"] = torch.version.cuda
env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
env["device"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1))
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True)
    env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
elif mode == "gpu":
    print("env: torch sees no CUDA device", file=sys.stderr)
json.dump(env, open(os.path.join(run, "env.json"), "w"), indent=1)
pip = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
open(os.path.join(run, "pip.txt"), "w").write(pip.stdout)
print(json.dumps(env, indent=1))
sys.exit(1 if mode == "gpu" and env["device"] is None else 0)
EOF
# cnnperf.kernels is mapped from the top-level kernels/ folder by the package metadata, so PYTHONPATH alone
# cannot import it: an editable install can, with no dependencies, no index and no build environment.
((INSTALL)) && step install 60 120 "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
step import 60 90 "$PY" -c 'import cnnperf, cnnperf.benchmarks.conv, cnnperf.kernels.conv_bias_relu as k
print("cnnperf", cnnperf.__version__, "kernels from", k.__file__)'
if [[ $(tail -n 1 "$STEPS" | cut -f2) != 0 ]]; then
    echo "=== gpu_check: cnnperf does not import; the other steps would all fail the same way"
    LEFT_OUT=1
fi

if [[ -z ${LEFT_OUT:-} ]]; then
    step kernel-tests 150 240 "$PY" -m pytest -q -p no:cacheprovider -rfE tests -m "gpu or kernels" \
        -n "$PYTEST_JOBS" --junitxml "$RUN/tests_kernels.xml" "${KERNEL_TESTS_R[@]}"
    # The benchmark stops starting new shapes 20 s before its cap and rewrites its record after every shape.
    step bench-conv 110 120 "$PY" -m cnnperf bench --model resnet50,vgg16 --pass all --variants eager,cnnperf \
        --backend triton --dtype bfloat16 --limit 8 --time-budget 85 --out "$RUN/bench_conv.json" "${BENCH_R[@]}"
    step train-step 120 120 "$PY" bench/bench_train_step.py --models resnet50 --batch-size 64 \
        --variants eager,fused,compile --json "$RUN/bench_train_step.json" "${TRAIN_R[@]}"
    step bench-clip 60 90 "$PY" -m cnnperf bench-clip --case all --out "$RUN/bench_clip.json" "${CLIP_R[@]}"
    step profile-resnet50 100 150 "$PY" -m cnnperf profile --model resnet50 --data fake --batch-size 128 \
        --variants tf32,bf16,fp16,channels_last,cudnn_benchmark,fuse,compile --budget 75 --batch-sizes none \
        --out "$RUN/profile_resnet50_b128" "${PROFILE_R[@]}"
    step other-tests 90 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests -m "not gpu and not kernels" \
        -n "$PYTEST_JOBS" --junitxml "$RUN/tests_other.xml" "${OTHER_TESTS_R[@]}"
    step doctor 45 90 "$PY" -m cnnperf doctor --device cuda --epochs 2 --quiet --out "$RUN/doctor" "${DOCTOR_R[@]}"
    step profile-resnet18 60 150 "$PY" -m cnnperf profile --model resnet18 --data fake --batch-size 128 \
        --variants bf16,channels_last,fuse --budget 40 --batch-sizes auto \
        --out "$RUN/profile_resnet18_b128" "${PROFILE_R[@]}"
    # torch.compile with max-autotune tunes every shape for tens of seconds: as many as the time left allows,
    # and only when that is enough for one shape (a step that cannot finish would only fail the check).
    COMPILE_S=$(($(left) - KILL_GRACE_S - 5))
    if rehearsing || ((COMPILE_S >= 120)); then
        step bench-compile "$COMPILE_S" 180 "$PY" -m cnnperf bench --model resnet50 --pass all \
            --variants eager,compile,cnnperf --backend triton --dtype bfloat16 --limit 4 \
            --time-budget $((COMPILE_S - 60)) --out "$RUN/bench_conv_compile.json" "${BENCH_R[@]}"
    else
        echo "=== bench-compile: not run, ${COMPILE_S} s left (a max-autotune compile needs more)"
    fi
fi

echo "=== gpu_check ($MODE): status $STATUS after $SECONDS s"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
exec 1>&3 2>&4 3>&- 4>&-  # end of the log: tee sees end-of-file and exits
for _ in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done  # at most 5 s, then on
kill "$TEE_PID" 2>/dev/null
publish
# What the device tool would bring back ($OUT), or what a rehearsal wrote: within its limits, or the run fails.
if [[ -n ${OUT:-} ]] || rehearsing; then
    "$PY" bench/gpu_check_record.py check-out "$RESULTS" || STATUS=1
fi
echo "gpu_check: status $STATUS; unpack with: tar -xzf $RESULTS/$NAME.tar.gz -C bench/results/"
exit "$STATUS"
