#!/usr/bin/env bash
# Issue 13's GPU work in one call of the device tool: a cross-validated recipe search (two seeds, BUS-BRA beside
# every row) and the GPU speed table. Prepare here, then call the device tool:
#   python scripts/pack_for_device.py --data ../shared/data/busi_dev --data ../shared/data/busbra_dev
#   run(command="bash benchmarks/device_search.sh 1", carry=[".device"], timeout_s=600)   # plan 1, then plan 2
# Every `busi cv` is 3-fold grouped on the shrunken busi_dev (.device/, long side 288 px) and also scores the shrunken
# busbra_dev; a run that would not finish before the call's limit is skipped and said so. Results come back as
# $OUT/results-PLAN.tgz (cv_metrics.json, fold_metrics.csv, predictions, config.yaml and log of each run; no weights)
# and $OUT/speed-gpu.md; read them with benchmarks/accuracy.py --collect and benchmarks/external.py --cv.
set -uo pipefail
plan=${1:-1}
OUT=${OUT:-/tmp/device-out}
budget=${BUDGET_S:-540}  # seconds of this call that the runs may use, leaving time to pack the results
# A dry run on a CPU, to check the commands before spending device time on them:
#   SKIP_WHEELS=1 PY=.venv/bin/python ACCEL=cpu EXTRA="--epochs 1 --image-size 32" BUDGET_S=100 bash benchmarks/device_search.sh 1
PY=${PY:-python3}
ACCEL=${ACCEL:-gpu}
EXTRA=${EXTRA:-}
D=.device/data
mkdir -p runs "$OUT"
[ -n "${SKIP_WHEELS:-}" ] || $PY -m pip install -q --no-deps --no-index .device/wheels/*.whl || exit 1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
pack() { tar czf "$OUT/results-$plan.tgz" --exclude='*.pth' --exclude='*.ckpt' --exclude='lightning' runs; }
trap pack EXIT

cv() {  # cv NAME SECONDS_EXPECTED busi-cv-args…
    local name=$1 expect=$2; shift 2
    if (( SECONDS + expect > budget )); then echo "$name: skipped (${SECONDS} s used, needs ~${expect} s)"; return; fi
    local start=$SECONDS
    $PY -m busi.cli cv --data $D/busi_dev --folds 3 --accelerator $ACCEL --no-progress --out runs/$name --overwrite \
        --external $D/busbra_dev --external-meta $D/busbra_dev/bus_data.csv \
        --external-patient-column Case --external-group-column Device "$@" $EXTRA > runs/$name.log 2>&1
    echo "$name: rc $? in $((SECONDS - start)) s"
    grep -E "^efficientnet|^resnet" runs/$name.log | grep -v " fold " || tail -3 runs/$name.log
}
L0="--weights .device/weights/efficientnet-lite0.pth"
L2="--weights .device/weights/efficientnet-lite2.pth"
case $plan in
1)  # the recommended recipe as a control (its CPU CV on full images: 0.795), then Lite2 and longer Lite0, seed 0
    cv lite0-224-30-s0 90 --config configs/recommended.yaml $L0 --seed 0
    cv lite2-256-60-s0 240 --config configs/recommended-gpu.yaml $L2 --seed 0
    cv lite0-224-60-s0 150 --config configs/recommended.yaml $L0 --epochs 60 --seed 0
    cv lite2-256-60-s1 240 --config configs/recommended-gpu.yaml $L2 --seed 1
    ;;
2)  # second seeds, the issue-14 remedy on the bigger model, and the recommended recipe's random-split twin
    # (Lite0 from scratch was cross-validated on the CPU: benchmarks/results/lite0-scratch)
    cv lite0-224-60-s1 150 --config configs/recommended.yaml $L0 --epochs 60 --seed 1
    cv lite2-256-60-clean-s0 240 --config configs/recommended-gpu.yaml $L2 --seed 0 --preprocess crop overlays
    cv lite0-224-30-random-s0 90 --config configs/recommended.yaml $L0 --seed 0 --split random
    if (( SECONDS + 120 < budget )); then
        $PY benchmarks/speed.py --data $D/busi_dev --accelerator $ACCEL --seed-experiment --md "$OUT/speed-gpu.md" \
            --json "$OUT/speed-gpu.json" > runs/speed.log 2>&1; echo "speed: rc $?"; tail -5 runs/speed.log
    fi
    ;;
*)  echo "unknown plan '$plan' (1 or 2)"; exit 2 ;;
esac
