#!/usr/bin/env bash
# Builds, from scratch, what travels to the lent GPU machine (no internet there) for running real
# ComfyUI + this pack: the folder that scripts/device_bootstrap.sh reads on the device.
#
#     bash scripts/make_device_carry.sh [TARGET]      # TARGET defaults to <repo>/lab
#
# TARGET gets:
#   ComfyUI.tgz   ComfyUI 0.30.0 source, slimmed (see comfyui_file_list for what is left out and why)
#   whl/          Python 3.12 x86-64 wheels of the packages the device image lacks
#   whl-opt/      typing_extensions, installed on the device only where its own is too old
#   whl-anchor/   diffusers, for bench/seed_anchor.py alone: carry lab/whl-anchor only in the
#                 call that runs it (with the repository, the whole of lab/ is over a call's 64 MiB)
#   stubs/av      the PyAV stand-in (benchmarks only; never part of the pack's runtime or CI)
# A relative TARGET is taken from the current directory. Run it here, where PyPI can be reached;
# re-running it downloads only the wheels that are missing and rebuilds the rest.
#
# Environment (relative paths are taken from the repository root):
#   COMFYUI_DIR        the ComfyUI tree to pack (default .host/ComfyUI, made by scripts/setup_host.sh)
#   FLUXACCEL_AV_STUB  the PyAV stand-in to copy (default ../shared/device/stubs/av, which lies
#                      outside the repository, beside the checkout)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

# Every call sends the working tree plus the carried paths, 64 MiB in all: keep room for the repo.
MAX_MIB=60

# Pinned to the set first carried by hand; the device image has Python 3.12 and its own torch,
# numpy, transformers..., which must not be carried (scripts/device_bootstrap.sh checks that).
# ComfyUI 0.30.0's own needs that the device image lacks, with their dependencies:
COMFY_WHEELS=(
    torchsde==0.2.6 trampoline==0.1.2 comfy-kitchen==0.2.26 comfy-aimdo==0.4.11
    pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 annotated-types==0.8.0
    typing-inspection==0.4.5 python-dotenv==1.2.4 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3
    simpleeval==1.0.8 blake3==1.0.11
)
# The pack's optional back-ends, compared in its benchmarks:
PACK_WHEELS=(torchao==0.17.0)
# The seed anchor's FLUX transformer, carried only by the call that runs the anchor:
ANCHOR_WHEELS=(diffusers==0.42.1)
# para-attn ships an sdist only; it is pure Python, so one wheel built here serves Python 3.12 there.
PARA_ATTN=para-attn==0.3.38
# pydantic 2.14 needs typing_extensions >= 4.16; the bootstrap adds it only where the device's is older.
OPT_WHEELS=(typing-extensions==4.16.0)

log() { printf '[carry] %s\n' "$*" >&2; }
die() { printf '[carry] FAILED: %s\n' "$*" >&2; exit 1; }

# A path from the environment, taken from the repository root when relative.
from_repo() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$repo/$1" ;;
    esac
}

comfy_src="$(from_repo "${COMFYUI_DIR:-.host/ComfyUI}")"
av_stub="$(from_repo "${FLUXACCEL_AV_STUB:-../shared/device/stubs/av}")"

# The file name prefix a wheel of NAME==VERSION has (PEP 427 escapes '-' and '.' in the name as '_').
wheel_prefix() {
    local name="${1%%==*}" version="${1#*==}"
    name="$(printf '%s' "$name" | tr 'A-Z.-' 'a-z__')"
    printf '%s-%s-' "$name" "$version"
}

# The wheel in DIR for NAME==VERSION, or nothing. Case-insensitive: some projects keep
# capitals in their wheel names (SQLAlchemy did).
find_wheel() {
    local dir="$1" prefix
    prefix="$(wheel_prefix "$2")"
    find "$dir" -maxdepth 1 -type f -iname "${prefix}*.whl" | sort | head -n 1
}

# run_pip ARGS...: python3 -m pip, less the noise of this machine's pip configuration, which names
# local package folders that lack most packages.
run_pip() {
    python3 -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
    return "${PIPESTATUS[0]}"
}

pip_download() {
    # The device runs CPython 3.12 on x86-64 with glibc >= 2.28. pip matches each manylinux tag
    # exactly, so every tag a wanted wheel might carry is named; the order says which one wins.
    run_pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
        --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
        "$@"
}

# fetch_wheels DIR NAME==VERSION...: downloads each wheel not already in DIR.
fetch_wheels() {
    local dir="$1" spec
    shift
    mkdir -p "$dir"
    for spec in "$@"; do
        if [[ -n "$(find_wheel "$dir" "$spec")" ]]; then
            continue
        fi
        log "downloading $spec"
        pip_download -d "$dir" "$spec" || die "pip download $spec"
        [[ -n "$(find_wheel "$dir" "$spec")" ]] || die "pip download $spec left no $(wheel_prefix "$spec")*.whl in $dir"
    done
}

build_para_attn() {
    local dir="$1"
    if [[ -n "$(find_wheel "$dir" "$PARA_ATTN")" ]]; then
        return
    fi
    log "building a wheel of $PARA_ATTN from its sdist"
    # --no-binary: PyPI has no wheel of it; this also keeps pip from taking one from a local index.
    # Named for para-attn alone: its build requirements (setuptools...) may come as wheels.
    run_pip wheel --quiet --no-deps --no-binary=para-attn -w "$dir" "$PARA_ATTN" || die "pip wheel $PARA_ATTN"
    [[ -n "$(find_wheel "$dir" "$PARA_ATTN")" ]] || die "pip wheel $PARA_ATTN left no wheel in $dir"
}

# trim_wheel WHEEL MEMBER...: removes MEMBERs (a path, or a folder ending in '/') from WHEEL and from
# its RECORD; a removed top-level folder also leaves top_level.txt. Does nothing if none is present,
# so re-running it is harmless. pip checks no hashes on a --no-index install, but a RECORD that names
# missing files would confuse a later uninstall.
trim_wheel() {
    python3 - "$@" <<'EOF' || die "trimming $1"
import os, sys, zipfile

whl, drop = sys.argv[1], sys.argv[2:]

def dropped(path):
    return any(path == d or (d.endswith("/") and path.startswith(d)) for d in drop)

with zipfile.ZipFile(whl) as zin:
    infos = zin.infolist()
    if not any(dropped(i.filename) for i in infos):
        sys.exit(0)
    gone_tops = {d.rstrip("/") for d in drop if d.endswith("/") and d.count("/") == 1}
    tmp = whl + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in infos:
            if dropped(info.filename):
                continue
            data = zin.read(info)
            base = info.filename.rsplit("/", 1)[-1]
            if ".dist-info/" in info.filename and base == "RECORD":
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not dropped(l.split(",", 1)[0])).encode()
            elif ".dist-info/" in info.filename and base == "top_level.txt":
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if l.strip() not in gone_tops).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(tmp, whl)
print("[carry] trimmed %s: %s" % (os.path.basename(whl), " ".join(drop)), file=sys.stderr)
EOF
}

# trim SPEC MEMBER...: trim_wheel on the wheel of SPEC (NAME==VERSION) in DIR.
trim() {
    local dir="$1" spec="$2" whl
    shift 2
    whl="$(find_wheel "$dir" "$spec")"
    [[ -n "$whl" ]] || die "no wheel of $spec in $dir to trim"
    trim_wheel "$whl" "$@"
}

trim_wheels() {
    local dir="$1"
    # The HIP (AMD) build of comfy-kitchen's kernels: useless on an NVIDIA device, and large
    # (the wheel would not fit in a call's 64 MiB with it).
    trim "$dir" comfy-kitchen==0.2.26 comfy_kitchen/backends/hip/_C.abi3.so
    # torchao's wheel also installs a top-level 'test' package: dead weight, and a name that could
    # shadow another on the device's sys.path.
    trim "$dir" torchao==0.17.0 test/
}

# The ComfyUI files to carry, NUL-separated, relative to the ComfyUI tree ('.' first).
comfyui_file_list() {
    local src="$1"
    # Left out: what ComfyUI makes at run time or holds per user (input, output, temp, user, the
    # database, bytecode), this host's own additions (custom_nodes' contents, among them the link to
    # this checkout; in models/, everything but upstream's put_*_here placeholders and configs/, such
    # as the weights tests/support/flux_fixtures.py makes), and what a headless benchmark never loads: the
    # tokenizer data of the large text encoders (the bulk of the size; CLIP-L's, 1.6 MB, stays for the
    # test workflows' text encoder), blueprints, the API nodes, the tests, CI and git
    # metadata. Kept: an empty custom_nodes/ and every models/ folder, which folder_paths expects.
    (cd "$src" && find . \
        \( -path ./.git -o -path ./.ci -o -path ./.github \
           -o -path ./blueprints -o -path ./comfy_api_nodes -o -path ./tests -o -path ./tests-unit \
           -o -path ./input -o -path ./output -o -path ./temp -o -path ./user \
           -o -path './custom_nodes/*' -o -name __pycache__ \
           -o \( -type d -path './comfy/text_encoders/*_tokenizer' \) \) -prune \
        -o \( -type f -path './models/*' ! -name 'put_*' ! -path './models/configs/*' \) \
        -o -name '*.db' -o -name '*.pyc' \
        -o -print0) | LC_ALL=C sort -z
}

# Fails before any download when an input that is not fetched from PyPI is missing.
check_inputs() {
    [[ -f "$comfy_src/main.py" && -f "$comfy_src/comfyui_version.py" ]] \
        || die "no ComfyUI tree at $comfy_src (run scripts/setup_host.sh, or set COMFYUI_DIR)"
    [[ -f "$av_stub/__init__.py" ]] \
        || die "no PyAV stand-in at $av_stub (it lies outside the repository: set FLUXACCEL_AV_STUB to its folder)"
    command -v python3 >/dev/null || die "python3 not found"
}

make_comfyui_tgz() {
    local out="$1" src="$comfy_src"
    log "packing $src ($(sed -n 's/^__version__ = //p' "$src/comfyui_version.py" | tr -d "\"'"))"
    # Whatever the tree is called here, it unpacks as ComfyUI/ (the bootstrap expects /tmp/ComfyUI);
    # owner root and gzip without a timestamp keep the archive the same from run to run.
    comfyui_file_list "$src" \
        | tar -C "$src" --null --no-recursion -T - --owner=root:0 --group=root:0 \
              --transform 's|^\.|ComfyUI|S' -cf - \
        | gzip -n -9 > "$out/ComfyUI.tgz.tmp" \
        || die "packing $src"
    mv -f "$out/ComfyUI.tgz.tmp" "$out/ComfyUI.tgz"
}

copy_av_stub() {
    local out="$1" stub="$av_stub"
    rm -rf "$out/stubs/av"
    mkdir -p "$out/stubs"
    cp -R "$stub" "$out/stubs/av"
    # The source is read-only; keep the copy writable so that the next run can replace it.
    chmod -R u+w "$out/stubs/av"
}

check_size() {
    local out="$1" bytes
    # What a call other than the seed anchor's carries: everything but whl-anchor.
    bytes="$(du -sb --exclude=whl-anchor "$out" | cut -f1)"
    log "$out: $(awk -v b="$bytes" 'BEGIN { printf "%.1f MiB", b / 1048576 }') in all"
    (( bytes <= MAX_MIB * 1048576 )) || die "$out is over ${MAX_MIB} MiB: it would not fit in one call with the repository"
}

main() {
    local out="${1:-$repo/lab}"
    mkdir -p "$out"
    out="$(cd "$out" && pwd -P)"
    check_inputs

    make_comfyui_tgz "$out"
    fetch_wheels "$out/whl" "${COMFY_WHEELS[@]}" "${PACK_WHEELS[@]}"
    build_para_attn "$out/whl"
    trim_wheels "$out/whl"
    fetch_wheels "$out/whl-opt" "${OPT_WHEELS[@]}"
    fetch_wheels "$out/whl-anchor" "${ANCHOR_WHEELS[@]}"
    copy_av_stub "$out"
    check_size "$out"
    log "done: carry lab/ComfyUI.tgz, lab/whl, lab/whl-opt, lab/stubs (and lab/whl-anchor for the seed anchor)"
    log "and 'source scripts/device_bootstrap.sh' on the device"
}

main "$@"
