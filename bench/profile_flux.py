"""Where a sampling step's GPU time goes: bench/flux.py's variants under torch.profiler, by kernel kind.

Each variant is loaded and warmed up as in bench/flux.py (same weights, inputs and variant names),
then one whole KSampler run is profiled. Per step it reports the wall time, the time the GPU spent
in kernels (the rest is the GPU waiting for the host), that time split by kind (matmuls, attention,
Triton kernels inductor generated, copies, NCCL communication, other), and the heaviest kernels. Under
Context Parallel it profiles ComfyUI's GPU (rank 0); its NCCL time includes waiting for the other GPUs.

    source scripts/device_bootstrap.sh && python3 -m bench.profile_flux \
        --variants core-bf16+fluxaccel-compile,core-bf16+fluxaccel-fp8+fluxaccel-compile --out $OUT/profile.json
"""
import argparse
import json
import os
import time

import torch

import bench_flux
from tests.support import flux_fixtures

# (kind, substrings of a kernel's name, lower case), first match wins.
# Inductor names its Triton kernels after the ops they fuse, so "triton" is tested first; NCCL's
# kernels (Context Parallel's all-to-alls and gathers) are "communication".
KERNEL_KINDS = [
    ("triton", ("triton",)),
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "f8f8")),
    ("copy", ("copy", "cat", "memcpy", "memset", "fill")),
]


def kernel_kind(name):
    lowered = name.lower()
    return next((kind for kind, needles in KERNEL_KINDS if any(n in lowered for n in needles)), "other")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI folder (default $COMFYUI_DIR)")
    parser.add_argument("--variants", required=True, help="comma list of bench/flux.py variants")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--top", type=int, default=15, help="kernels listed per variant")
    parser.add_argument("--out", default=None, help="write the profiles as JSON here")
    return parser.parse_args()


def profiled_sample(model, resolution, steps):
    """(wall seconds, kernel-time table) of one KSampler run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        started = time.perf_counter()
        bench_flux.timed_sample(model, resolution, steps, bench_flux.MODELS["flux1-dev"])
        wall = time.perf_counter() - started
    kernels = [(event.key, event.device_time_total / 1e3, event.count) for event in profiler.key_averages()
               if event.device_time_total > 0]
    return wall, kernels


def summarize(variant, wall, kernels, steps, top):
    kinds = {}
    for name, milliseconds, _ in kernels:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + milliseconds / steps
    busy = sum(kinds.values())
    heaviest = sorted(kernels, key=lambda kernel: -kernel[1])[:top]
    return {
        "variant": variant,
        "ms_per_step": round(wall * 1e3 / steps, 2),
        "gpu_busy_ms_per_step": round(busy, 2),
        "kinds_ms_per_step": {kind: round(ms, 2) for kind, ms in sorted(kinds.items(), key=lambda item: -item[1])},
        "heaviest": [{"kernel": name[:160], "kind": kernel_kind(name), "ms_per_step": round(ms / steps, 3),
                      "calls_per_step": round(count / steps, 1)} for name, ms, count in heaviest],
    }


def profile_variant(state_dict, variant, args):
    import comfy.model_management

    model = bench_flux.apply_variant(bench_flux.load_model(dict(state_dict), fp8="fp8fast" in variant), variant)
    # Warm-up: loads and compiles.
    bench_flux.timed_sample(model, args.resolution, args.steps, bench_flux.MODELS["flux1-dev"])
    wall, kernels = profiled_sample(model, args.resolution, args.steps)
    del model
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    return summarize(variant, wall, kernels, args.steps, args.top)


def main():
    args = parse_args()
    flux_fixtures.use_comfyui(args.comfyui)
    flux_fixtures.import_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    state_dict = bench_flux.random_state_dict(flux_fixtures.flux_dev_width_unet_config(19, 38, context_in_dim=4096),
                                              torch.device("cuda"))
    profiles = []
    for variant in args.variants.split(","):
        profiles.append(profile_variant(state_dict, variant, args))
        print(json.dumps(profiles[-1], indent=1), flush=True)
        if args.out:
            with open(args.out, "w") as file:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "resolution": args.resolution, "steps": args.steps, "profiles": profiles}, file, indent=1)


if __name__ == "__main__":
    main()
