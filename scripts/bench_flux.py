"""Times full KSampler runs of a FLUX.1-dev-shaped model in real ComfyUI, core options beside the pack's.

FLUX.1-dev shapes (hidden 3072, 19 double + 38 single blocks, T5-width text of 512 tokens), random
weights, Euler, batch 1, cfg 1. Every variant samples the same inputs in this one process: a warm-up
run (its time is the first-run overhead), then `--runs` timed runs (median reported).

    python scripts/bench_flux.py --variants core-bf16,fbc-0,fbc-alternate --resolutions 1024 --out results.json

Variants:
  core-bf16, core-fp8fast            ComfyUI alone: bf16 weights; fp8_e4m3fn weights with fp8_optimizations
  core-bf16+compile, core-fp8fast+compile   the same under core TorchCompileModel (inductor)
  <any>+fluxaccel-compile            the variant under the pack's Compile FLUX (regional, default mode, CUDA graphs)
  <any>+fluxaccel-compile-no-cudagraphs   the same with the node's cuda_graphs off (kernels launched one by one)
  <any>+fluxaccel-fp8                the variant under the pack's FP8 Dynamic Quantize (per-row activations);
                                     modifiers apply left to right: core-bf16+fluxaccel-fp8+fluxaccel-compile
  <any>+fluxaccel-attention          the variant under the pack's FLUX Attention Backend (auto)
  <any>+fluxaccel-cp<U>[x<R>]        the variant under Context Parallel on U x R GPUs: Ulysses degree U,
                                     ring degree R (default 1); +fluxaccel-ring<R> is ring attention alone.
                                     Rows add each worker GPU's peak VRAM (worker_peak_vram_gb)
  fbc-<threshold>                    Apply First Block Cache at that threshold (random weights: the
                                     skip ratio says little about a trained model)
  fbc-0                              the cache's hooks with nothing reused: cost of a computed step
  fbc-alternate                      no threshold, max 1 reuse in a row: every other step reused
  fbc-all                            no threshold, no limit: one computed step, the rest reused
  bc-default                         Apply Block Cache at its defaults (Taylor order 1, threshold 0.22)
  bc-every<n>[-o<order>]             Apply Block Cache's fixed schedule: every n-th step computed, the
                                     others predicted at that Taylor order (default 1): bc-every2 is
                                     fbc-alternate with predictions instead of reuse
Needs a CUDA GPU for FLUX.1-dev shapes; `--tiny` runs one double + one single block on the CPU.
Compiled graphs persist in <ComfyUI>/user/fluxaccel/torch-compile-cache: a second process running the
same variant shows the warm-restart overhead as its first run. `--passes 2` samples the resolutions
twice with the same model: the second pass must compile nothing (the rows' graphs_compiled).
"""
import argparse
import gc
import json
import os
import sys
import time

import torch

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS_DIR)
import bench_report  # noqa: E402
import flux_fixtures  # noqa: E402
from cache_reports import CacheReportRecorder  # noqa: E402

FLUX_DEV_TEXT_TOKENS = 512
# (threshold, max_consecutive_hits): 1e9 is above any relative change, so reuse follows the limit alone.
FBC_FIXED_PATTERNS = {
    "fbc-0": (0.0, 0),
    "fbc-alternate": (1e9, 1),
    "fbc-all": (1e9, 0),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI folder (default $COMFYUI_DIR)")
    parser.add_argument("--variants", default="core-bf16,fbc-0,fbc-alternate,fbc-all,fbc-0.08,fbc-0.12")
    parser.add_argument("--resolutions", type=lambda text: [int(r) for r in text.split(",")], default=[1024],
                        help="comma list, e.g. 512,768,1024,1536: each variant is loaded once and sampled at each")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--passes", type=int, default=1, help="times the resolution list is sampled with each model")
    parser.add_argument("--tiny", action="store_true", help="one double + one single block, for a CPU smoke run")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the results as a markdown table here")
    return parser.parse_args()


@torch.no_grad()
def randomize_like_trained(model, generator):
    """Weights N(0, fan_in^-1/2), biases 0, norm scales 1: unit-variance activations, like a trained net's."""
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2:
            parameter.normal_(0.0, parameter.shape[-1] ** -0.5, generator=generator)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)


def flux_dev_state_dict(depth, depth_single_blocks, device):
    """Random FLUX.1-dev-shaped weights (scaled like a trained net's: unit-variance activations)."""
    import comfy.ldm.flux.model
    import comfy.ops

    config = flux_fixtures.flux_dev_width_unet_config(depth, depth_single_blocks, context_in_dim=4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = comfy.ldm.flux.model.Flux(**config, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    randomize_like_trained(model, torch.Generator(device=device).manual_seed(0))
    return {name: tensor.to("cpu") for name, tensor in model.state_dict().items()}


def load_model(state_dict, fp8):
    import comfy.sd

    options = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True} if fp8 else {}
    return comfy.sd.load_diffusion_model_state_dict(dict(state_dict), model_options=options)


def conditioning():
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(1, FLUX_DEV_TEXT_TOKENS, 4096, generator=generator)
    pooled = torch.randn(1, 768, generator=generator)
    positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]
    return positive, negative


def context_parallel_degrees(part):
    """(ulysses, ring) of a +fluxaccel-cp<U>[x<R>] or +fluxaccel-ring<R> variant part, else None."""
    if part.startswith("fluxaccel-ring"):
        return 1, int(part[len("fluxaccel-ring"):])
    if part.startswith("fluxaccel-cp"):
        ulysses, _, ring = part[len("fluxaccel-cp"):].partition("x")
        return int(ulysses), int(ring or 1)
    return None


def apply_variant(model, variant):
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from fluxaccel.nodes.attention import FluxAttentionBackend
    from fluxaccel.nodes.compile import CompileFlux
    from fluxaccel.nodes.context_parallel import ContextParallel
    from fluxaccel.nodes.first_block_cache import ApplyBlockCache, ApplyFirstBlockCache
    from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize

    base, *modifiers = variant.split("+")
    parallel = None
    for part in modifiers:
        if (degrees := context_parallel_degrees(part)) is not None:
            parallel = degrees
        elif part == "compile":
            model = model.clone()
            set_torch_compile_wrapper(model=model, backend="inductor")
        elif part in ("fluxaccel-compile", "fluxaccel-compile-no-cudagraphs"):
            model = CompileFlux.execute(model, "default", "automatic", part == "fluxaccel-compile").result[0]
        elif part == "fluxaccel-fp8":
            model = FP8DynamicQuantize.execute(model, "per-row", "").result[0]
        elif part == "fluxaccel-attention":
            model = FluxAttentionBackend.execute(model, "auto").result[0]
        else:
            raise ValueError(f"unknown variant part {part!r} in {variant!r}")
    if base.startswith("fbc-"):
        threshold, max_hits = FBC_FIXED_PATTERNS[base] if base in FBC_FIXED_PATTERNS else (float(base[len("fbc-"):]), 0)
        model = ApplyFirstBlockCache.execute(model, threshold, 0.0, 1.0, max_hits).result[0]
    if base.startswith("bc-"):
        inputs = {i.id: i.default for i in ApplyBlockCache.define_schema().inputs if i.id != "model"}
        if base.startswith("bc-every"):
            every, _, order = base[len("bc-every"):].partition("-o")
            inputs.update(every_n_steps=int(every), taylor_order=int(order or 1))
        elif base != "bc-default":
            raise ValueError(f"unknown Block Cache variant {base!r}")
        model = ApplyBlockCache.execute(model, **inputs).result[0]
    if parallel is not None:
        # Last, as the node's description asks: what comes before carries over to every GPU.
        ulysses, ring = parallel
        model = ContextParallel.execute(model, ulysses * ring, ulysses, ring, 0, False, "this machine").result[0]
    return model


def timed_sample(model, resolution, steps):
    import nodes

    positive, negative = conditioning()
    latent = {"samples": torch.zeros(1, 16, resolution // 8, resolution // 8)}
    synchronize()
    started = time.perf_counter()
    with CacheReportRecorder() as recorder:
        (out,) = nodes.common_ksampler(model, 7, steps, 1.0, "euler", "simple", positive, negative, latent)
    synchronize()
    return time.perf_counter() - started, out["samples"].float(), recorder


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker_memory(reset=False):
    """Each Context Parallel worker's (allocated GiB, peak GiB) on its GPU, or [] without workers."""
    from fluxaccel.nodes.context_parallel_pool import active_pool
    from fluxaccel.nodes.context_parallel_ranks import DeviceMemory

    pool = active_pool()
    if pool is None:
        return []
    return [[round(value / 2**30, 2) for value in answer] for answer in pool.ask(DeviceMemory(reset))]


def measure(model, resolution, args, reference):
    """Warm-up run, then `args.runs` timed runs of one model at one resolution."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        worker_memory(reset=True)
    first_seconds, _, first_recorder = timed_sample(model, resolution, args.steps)
    timings = [timed_sample(model, resolution, args.steps) for _ in range(args.runs)]
    seconds = sorted(t for t, _, _ in timings)
    _, samples, recorder = timings[-1]
    row = {
        "resolution": resolution,
        "median_s": round(seconds[len(seconds) // 2], 3),
        "times_s": [round(t, 3) for t in seconds],
        "first_run_s": round(first_seconds, 2),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "worker_peak_vram_gb": [peak for _, peak in worker_memory()] or None,
        "steps_reused": recorder.reports[-1][2] if recorder.reports else 0,
        # What Compile FLUX's CUDA graphs did in the last timed run (segments under First Block Cache).
        "cuda_graphs": recorder.cuda_graphs[-1] if recorder.cuda_graphs else None,
        # Graphs Compile FLUX compiled in the warm-up run and in the timed runs (None: not compiled by it).
        "graphs_compiled": None if not first_recorder.graphs_compiled else
        [sum(first_recorder.graphs_compiled), sum(sum(r.graphs_compiled) for _, _, r in timings)],
        "rel_error_vs_first_variant": None if reference is None else
        round(((samples - reference).norm() / reference.norm()).item(), 4),
    }
    return row, samples


def run_variant(state_dict, variant, args, references):
    """Rows of one variant over the resolutions; the first variant's samples become the references."""
    import comfy.model_management

    model = apply_variant(load_model(state_dict, fp8="fp8fast" in variant), variant)
    rows = []
    for sweep_pass in range(1, args.passes + 1):
        for resolution in args.resolutions:
            row, samples = measure(model, resolution, args, references.get(resolution))
            references.setdefault(resolution, samples)
            rows.append({"variant": variant, "pass": sweep_pass, **row})
            print(json.dumps(rows[-1]), flush=True)
    del model
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    # What the variant left allocated once ComfyUI unloaded it (a leak shows here), then what a
    # garbage collection frees, as ComfyUI's server does between prompts, for the next variant.
    held = allocated_gib()
    gc.collect()
    comfy.model_management.soft_empty_cache()
    held_after_gc = allocated_gib()
    workers_held = [allocated for allocated, _ in worker_memory()] or None
    for row in rows:
        row.update(vram_after_unload_gb=held, vram_after_unload_and_gc_gb=held_after_gc,
                   worker_vram_after_unload_gb=workers_held)
    print(json.dumps({"variant": variant, "vram_after_unload_gb": held, "after_gc": held_after_gc,
                      "workers": workers_held}), flush=True)
    return rows


def allocated_gib():
    return round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def report_title(report):
    return (f"{report['device']}, torch {report['torch']}, {report['steps']} steps, "
            f"{report['blocks'][0]} double + {report['blocks'][1]} single blocks, batch 1")


def main():
    args = parse_args()
    flux_fixtures.use_comfyui(args.comfyui)
    flux_fixtures.import_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    depth, singles = (1, 1) if args.tiny else (19, 38)
    state_dict = flux_dev_state_dict(depth, singles, device)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "steps": args.steps, "blocks": [depth, singles], "rows": [],
    }
    title, references = report_title(report), {}
    for variant in args.variants.split(","):
        report["rows"] += run_variant(state_dict, variant, args, references)
        bench_report.update_report(report, title, args.out, args.markdown)
    print(bench_report.markdown_table(report, title))


if __name__ == "__main__":
    main()
