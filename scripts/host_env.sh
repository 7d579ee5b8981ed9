# Sourced by the setup and test scripts: where the development host lives.
PACK_NAME="comfyui-fluxaccel"
export FLUXACCEL_HOST="${FLUXACCEL_HOST:-$pack_dir/.host}"
if [[ -n "${COMFYUI_PATH:-}" ]]; then
    export COMFYUI_DIR="$(cd "$COMFYUI_PATH" && pwd)"
    HOST_PYTHON="${FLUXACCEL_PYTHON:-$(command -v python3)}"
else
    export COMFYUI_DIR="$FLUXACCEL_HOST/ComfyUI"
    HOST_PYTHON="$FLUXACCEL_HOST/venv/bin/python"
fi
export HOST_PYTHON
