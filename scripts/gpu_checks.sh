#!/usr/bin/env bash
# The prepared GPU check of lora-edge: run it on a machine with an NVIDIA GPU, as one command.
#
#   bash scripts/gpu_checks.sh            # writes logs and JSON under $OUT (default /tmp/lora-edge-gpu)
#
# On a lent device machine (the `run` tool): command "bash scripts/gpu_checks.sh", timeout_s 420;
# $OUT then comes back: facts.txt, gpu-tests.log/.xml, profiles.log, fallback.json, profiles/*.json
# (8 files at most come back; four profiles.json files plus those four).
#
# What it runs (about 2 minutes on one GPU):
#   1. facts: nvidia-smi, Python, onnxruntime and its providers, torch/CUDA;
#   2. the @pytest.mark.gpu tests (tests/profile/test_gpu.py): CUDA provider options, IO binding,
#      fp16 graphs, partial CPU fallback flags, TensorRT or a clear "not measured";
#   3. `lora-edge profile` of a small synthetic bundle on each GPU device target, as a user runs it,
#      and the same without the GPU provider to show the refusal (exit 7) and --allow-fallback.
#
# It needs onnxruntime-gpu (the CUDA and TensorRT providers). A GPU image that has only the CPU
# onnxruntime (as the lent machines' image does) cannot get it there (no network, and the
# onnxruntime-gpu wheel is far over the 64 MiB a call may carry): the script then says so, runs the
# refusal check only, and exits 3. Extra Python wheels placed in .whl/ are installed first
# (pip --no-index --target /tmp/site), e.g. for psutil or click if an image lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lora-edge-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

echo "== 1. facts"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/facts.txt"
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/facts.txt"
import platform, onnxruntime
print("python", platform.python_version(), "| onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    print("torch: not installed (eager baselines skipped)")
PY
HAS_CUDA=$("$PY" -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))")
"$PY" -c "import lora_edge.profile.profiler, psutil, click" || { echo "lora-edge does not import with $PY: carry the missing wheels in .whl/"; exit 2; }

echo "== 2. gpu tests"
status=0
if [ "$HAS_CUDA" = 1 ]; then
    "$PY" -m pytest -q -m gpu tests/profile/test_gpu.py -p no:cacheprovider -o addopts="-ra" \
        --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
    status=${PIPESTATUS[0]}
else
    echo "CUDAExecutionProvider is not available: install onnxruntime-gpu (pip install -e '.[gpu]') to run them" \
        | tee "$OUT/gpu-tests.log"
fi

echo "== 3. lora-edge profile on the GPU device targets"
BUNDLE=$(mktemp -d)/bundle
"$PY" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from profile_bundles import synthetic_bundle
synthetic_bundle(Path('$BUNDLE'), forms=('merged', 'branched'), hidden=512, vocab=4000)
synthetic_bundle(Path('$BUNDLE-fp16'), forms=('merged', 'branched'), hidden=512, vocab=4000, fp16=True)
" || { echo "could not build the synthetic bundles"; exit 2; }
for device in t4-server jetson-orin; do
    for bundle in "$BUNDLE" "$BUNDLE-fp16"; do
        name="$device-$(basename "$bundle")"
        "$PY" -m lora_edge profile "$bundle" --device "$device" --batch 8 --seq 128 --runs 100 --warmup 10 \
            --no-eager > "$OUT/profile.tmp" 2>&1
        code=$?
        { echo "### $name: exit $code"; cat "$OUT/profile.tmp"; } >> "$OUT/profiles.log"
        echo "$name: exit $code"; tail -n 8 "$OUT/profile.tmp"
        mkdir -p "$OUT/profiles" && cp "$bundle/reports/profile.json" "$OUT/profiles/$name.json" 2>/dev/null
        [ "$HAS_CUDA" = 1 ] && [ "$device" = t4-server ] && [ $code -ne 0 ] && status=1
    done
done
if [ "$HAS_CUDA" != 1 ]; then
    # without the GPU provider: refused with exit 7, and --allow-fallback records the fallback
    "$PY" -m lora_edge profile "$BUNDLE" --device t4-server --runs 5 --warmup 1 --no-eager >/dev/null 2>&1
    refused=$?
    "$PY" -m lora_edge profile "$BUNDLE" --device t4-server --runs 5 --warmup 1 --no-eager --allow-fallback \
        --json > "$OUT/fallback.json" 2>/dev/null
    echo "without CUDA: refused with exit $refused (expected 7), --allow-fallback exit $?"
    [ $refused -eq 7 ] || status=1
    rm -f "$OUT/profile.tmp"
    exit $(( status == 0 ? 3 : status ))
fi
rm -f "$OUT/profile.tmp"
exit $status
