# Device-only set-up for running real ComfyUI + this pack on the lent GPU machine (no internet).
# Build what it reads here first, with `bash scripts/make_device_carry.sh` (it fills lab/), then source
# it from the repository root, with lab/ComfyUI.tgz, lab/whl, lab/whl-opt and lab/stubs named in the run's `carry`:
#     source scripts/device_bootstrap.sh && python3 -m bench.flux ...
# (diffusers, in lab/whl-anchor, is for the seed anchor alone: see bench/seed_anchor.py.)
# It: installs lab/whl/*.whl (only packages the device image lacks) into /tmp/site; puts /tmp/site and
# the PyAV stand-in lab/stubs on PYTHONPATH; unpacks lab/ComfyUI.tgz to /tmp/ComfyUI; links this checkout
# as /tmp/ComfyUI/custom_nodes/comfyui-fluxaccel; exports COMFYUI_DIR=/tmp/ComfyUI.
# The av stub is for benchmarks that never touch video: never use it in the pack's runtime or CI.
# Headless only: main.py/PromptServer exits without comfyui-frontend-package unless given
# `--front-end-root <some empty dir>`.
# No `set -e` here: it would stay on in the caller's shell. Each step checks itself instead.

_bs_fail() {
    echo "device_bootstrap.sh: FAILED: $*" >&2
    return 1
}

_bs_main() {
    local repo site=/tmp/site comfy=/tmp/ComfyUI
    # The checkout is the folder above this file's: the run starts in the repository root, but this
    # does not depend on it.
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)" \
        || { _bs_fail "cannot find the repository root from ${BASH_SOURCE[0]}"; return 1; }
    [ -f "$repo/lab/ComfyUI.tgz" ] && [ -d "$repo/lab/whl" ] && [ -d "$repo/lab/stubs/av" ] \
        || { _bs_fail "no lab/ComfyUI.tgz, lab/whl or lab/stubs/av under $repo: build them with scripts/make_device_carry.sh and name lab/ComfyUI.tgz, lab/whl, lab/whl-opt and lab/stubs in the run's carry"; return 1; }
    command -v python3 >/dev/null || { _bs_fail "python3 not found"; return 1; }

    # typing_extensions: pydantic 2.14 needs >= 4.16; carry it only where the device's own is older.
    local te_old
    te_old="$(python3 -c 'import importlib.metadata as m
try:
    v = tuple(int(x) for x in m.version("typing_extensions").split(".")[:2])
except Exception:
    v = (0, 0)
print(1 if v < (4, 16) else 0)' 2>/dev/null)" || te_old=1
    local wheels=("$repo"/lab/whl/*.whl)
    if [ "$te_old" = 1 ] && ls "$repo"/lab/whl-opt/typing_extensions-*.whl >/dev/null 2>&1; then
        echo "device_bootstrap.sh: device typing_extensions < 4.16, adding the carried one" >&2
        wheels+=("$repo"/lab/whl-opt/typing_extensions-*.whl)
    fi

    mkdir -p "$site" || { _bs_fail "cannot create $site"; return 1; }
    PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "${wheels[@]}" \
        || { _bs_fail "pip install of lab/whl/*.whl into $site"; return 1; }

    export PYTHONPATH="$site:$repo/lab/stubs${PYTHONPATH:+:$PYTHONPATH}"

    rm -rf "$comfy" && tar xzf "$repo/lab/ComfyUI.tgz" -C /tmp \
        || { _bs_fail "cannot unpack lab/ComfyUI.tgz into /tmp"; return 1; }
    [ -f "$comfy/main.py" ] || { _bs_fail "$comfy/main.py missing after unpacking"; return 1; }
    mkdir -p "$comfy/custom_nodes" && ln -sfn "$repo" "$comfy/custom_nodes/comfyui-fluxaccel" \
        || { _bs_fail "cannot link $repo into $comfy/custom_nodes"; return 1; }
    export COMFYUI_DIR="$comfy"

    # Cheap sanity check (no torch import): carried modules resolve, and nothing in /tmp/site shadows
    # the device's own torch/numpy/... (only missing packages are carried).
    python3 - "$site" <<'EOF' || { _bs_fail "sanity check (see above)"; return 1; }
import importlib.util, os, sys
site = sys.argv[1]
bad = []
for m in ["torchsde", "trampoline", "comfy_kitchen", "comfy_aimdo", "pydantic", "pydantic_core",
          "pydantic_settings", "sqlalchemy", "alembic", "mako", "simpleeval", "blake3", "torchao",
          "para_attn", "av"]:
    if importlib.util.find_spec(m) is None:
        bad.append("missing " + m)
for m in ["torch", "numpy", "triton", "torchvision", "torchaudio", "scipy", "transformers", "safetensors",
          "huggingface_hub", "PIL", "yaml", "aiohttp"]:
    s = importlib.util.find_spec(m)
    if s is None:
        bad.append("device lacks " + m)
    elif (s.origin or "").startswith(site):
        bad.append(m + " shadowed by " + s.origin)
try:
    import pydantic  # fails here if typing_extensions is too old
except Exception as e:
    bad.append("import pydantic: %r" % (e,))
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
    echo "device_bootstrap.sh: ok (COMFYUI_DIR=$COMFYUI_DIR, PYTHONPATH=$PYTHONPATH)" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "device_bootstrap.sh: source it (source scripts/device_bootstrap.sh && ...), or its exports are lost" >&2
    _bs_main
    exit $?
fi
_bs_main
