#!/usr/bin/env bash
# Runs the node-level tests and end-to-end server tests against the older ComfyUI releases the pack
# supports, each in its own host (<pack>/.host-<version>, built the first time without the demo).
# The whole suite runs against the default 0.30.0 host: scripts/run_tests.sh.
# Usage: bash scripts/run_matrix.sh [VERSION ...]   (default: 0.24.0 0.27.0)
set -euo pipefail
pack_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

versions=("$@")
(( ${#versions[@]} )) || versions=(0.24.0 0.27.0)

# Every node through ComfyUI's real ModelPatcher and KSampler, on every model of the FLUX family, the
# canary of each ComfyUI detail the pack relies on (test_comfy_contract.py: no node disabled there), and
# the server with the real loaders: what meets the ComfyUI details that change between releases
# (model_patcher, model_base, supported_models, ops, quant_ops, samplers, comfy_api, the server).
# Left to the default host, to keep each release near ten minutes on CI's two cores: what compiles
# FLUX's own model code (comfy/ldm/flux, the same in all three) once more (the compiled graphs
# across processes, sweeps, Compile FLUX on each model of the family: test_compile.py compiles
# FLUX.1 through the same ModelPatcher hooks), the 4-rank and equal-share Context Parallel cases,
# the GPU-only CUDA-graph tests, soak, editor and the shipped workflows.
matrix_tests=(
    tests/test_first_block_cache.py
    tests/test_block_cache.py
    tests/test_fp8_quantize.py
    tests/test_compile.py
    --deselect tests/test_compile.py::test_a_second_process_finds_the_compiled_graphs_on_disk
    --deselect tests/test_compile.py::test_compiles_after_another_torch_compile_in_the_process
    --deselect tests/test_compile.py::test_second_pass_of_a_sweep_compiles_nothing
    tests/test_attention.py
    tests/test_comfy_contract.py
    tests/test_flux_family.py
    --deselect tests/test_flux_family.py::test_compile_flux
    "tests/test_context_parallel.py::test_ulysses_gives_the_single_process_output[40-7-2]"
    tests/test_context_parallel.py::test_lora_fp8_compile_attention_and_first_block_cache_carry_over_to_the_workers
    tests/test_server.py::test_text_to_image_through_the_real_loaders
    tests/test_server.py::test_fp8_compile_and_cache_stack_through_the_real_loader
)

# The older releases' hosts reuse the default host's packages (torch and the rest): built first if absent.
shared_packages="$(
    unset FLUXACCEL_HOST COMFYUI_PATH FLUXACCEL_PYTHON COMFYUI_VERSION
    source "$pack_dir/scripts/host_env.sh"
    bash "$pack_dir/scripts/setup_host.sh" --no-demo >&2 &&
        "$HOST_PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'
)"

failed=()
for version in "${versions[@]}"; do
    printf '[matrix] ComfyUI %s\n' "$version"
    # Each release in its own host, whatever host the caller's environment names.
    if ! (
        unset FLUXACCEL_HOST COMFYUI_PATH FLUXACCEL_PYTHON
        export COMFYUI_VERSION="$version" FLUXACCEL_SHARED_PACKAGES="$shared_packages"
        source "$pack_dir/scripts/host_env.sh"
        bash "$pack_dir/scripts/setup_host.sh" --no-demo
        cd "$pack_dir"
        "$HOST_PYTHON" -m pytest "${matrix_tests[@]}"
    ); then
        failed+=("$version")
    fi
done
if (( ${#failed[@]} )); then
    printf '[matrix] failed on ComfyUI %s\n' "${failed[*]}"
    exit 1
fi
printf '[matrix] passed on ComfyUI %s\n' "${versions[*]}"
