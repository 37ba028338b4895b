#!/usr/bin/env bash
# The GPU rows still owed (bench/README.md, "What the last run did not cover"), in groups that each fit
# one 10-minute command on an offline GPU machine. Run from the repository root there:
#
#   bash bench/gpu_queue.sh setup        # wheels from ./.whl* and ./.dv/whl into /tmp/site, ComfyUI 0.33 into /tmp
#   bash bench/gpu_queue.sh 1            # issue 17's dynamic-VRAM rows (SD1.5 all modes, SDXL) + issue 18's cache plan
#   bash bench/gpu_queue.sh 2            # issue 18: Flux memory at batch 4; issue 16: Flux bf16/fp8 with and without offload
#   bash bench/gpu_queue.sh 3            # issue 16: Flux compiled (bf16, fp8), checkpointing on
#   bash bench/gpu_queue.sh 4            # compile per run (graphs each run, none left behind); Flux without checkpointing
#
# Logs and JSON go to $OUT (the device tool's folder) or ./gpu-out. Each group sources setup first, so
# one call per group is enough on a fresh machine. Which wheels and where the ComfyUI export comes from:
# bench/README.md, "An offline GPU machine".
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"

setup() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl*/*.whl .dv/whl/*.whl > /tmp/pip.log 2>&1 || { tail -5 /tmp/pip.log; exit 1; }
    [ -d /tmp/ComfyUI ] || tar xzf .dv/comfyui-0.33.0-min.tar.gz -C /tmp
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COMFYUI_ROOT=/tmp/ComfyUI
    echo "engine $(cat .gpu/COMMIT 2>/dev/null || echo '?') on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader);" \
         "torch $(python3 -c 'import torch; print(torch.__version__)')"
}

row() {  # row NAME SECONDS command...: run with a limit, keep the log, print its end
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"; tail -c 2500 "$OUT/$name.log"
}

case "${1:-}" in
  setup) setup ;;
  1) setup
     row dv_sd15 250 python3 -m bench.comfy_dynamic_vram --python python3 --families sd15 \
         --modes default,nodyn,lowvram,novram --steps 20 --work /tmp/dv1 --out "$OUT/dv_sd15.json"
     row oom 110 python3 -m bench.oom_recovery 4 --uncached --limit-gib 9
     row dv_sdxl 200 python3 -m bench.comfy_dynamic_vram --python python3 --families sdxl --modes default,nodyn \
         --steps 20 --work /tmp/dv2 --out "$OUT/dv_sdxl.json" ;;
  2) setup
     row memest_flux_b4 150 python3 -m bench.memory_estimate flux1 --batch 4
     row flux_offload 420 python3 -m bench.run --models flux1 --tools ours,ours-fp8-offload,ours-offload,ours-fp8 \
         --batches 1 --checkpointing on --uncached-batch 0 --steps 10 --warmup 3 --out "$OUT/flux_offload.json" ;;
  3) setup
     row flux_compile 560 python3 -m bench.run --models flux1 --tools ours,ours-compile,ours-fp8-compile \
         --batches 1 --checkpointing on --uncached-batch 0 --steps 10 --warmup 3 --out "$OUT/flux_compile.json" ;;
  4) setup
     row compile_session6 250 python3 -m bench.compile_session 6
     row compile_session4 150 python3 -m bench.compile_session 4 --max-graphs 1
     row flux_nockpt 150 python3 -m bench.run --models flux1 --tools ours,ours-compile --batches 1 \
         --checkpointing off --uncached-batch 0 --steps 10 --warmup 3 --out "$OUT/flux_nockpt.json" ;;
  *) sed -n 2,14p "$0"; exit 2 ;;
esac
