# Sourced by the setup and test scripts: where the development host lives.
PACK_NAME="comfyui-fluxaccel"
# The ComfyUI release a built host carries; 0.30.0 lives in .host, every other in its own .host-<version>.
export COMFYUI_VERSION="${COMFYUI_VERSION:-0.30.0}"
if [[ "$COMFYUI_VERSION" == 0.30.0 ]]; then
    export FLUXACCEL_HOST="${FLUXACCEL_HOST:-$pack_dir/.host}"
else
    export FLUXACCEL_HOST="${FLUXACCEL_HOST:-$pack_dir/.host-$COMFYUI_VERSION}"
fi
if [[ -n "${COMFYUI_PATH:-}" ]]; then
    export COMFYUI_DIR="$(cd "$COMFYUI_PATH" && pwd)"
    HOST_PYTHON="${FLUXACCEL_PYTHON:-$(command -v python3)}"
else
    export COMFYUI_DIR="$FLUXACCEL_HOST/ComfyUI"
    HOST_PYTHON="$FLUXACCEL_HOST/venv/bin/python"
fi
export HOST_PYTHON
