"""Times full KSampler runs of a FLUX-shaped model in real ComfyUI, core options beside the pack's.

`--model` picks the shapes (default flux1-dev), random weights, Euler, batch 1, cfg 1. Every variant
samples the same inputs in this one process: a warm-up run (its time is the first-run overhead), then
`--runs` timed runs (median reported).

    python -m bench.flux --variants core-bf16,fbc-0,fbc-alternate --resolutions 1024 --out results.json
    python -m bench.flux --model flux2-dev --runs 2 --out flux2_dev.json --variants \
        core-bf16,core-fp8fast+compile,core-bf16+fluxaccel-fp8+fluxaccel-compile+fluxaccel-attention,\
        fbc-alternate+fluxaccel-fp8+fluxaccel-compile+fluxaccel-attention

Models (ComfyUI's own classes, detected by ComfyUI from the random state dict like a real file):
  flux1-dev       FLUX.1-dev: hidden 3072 (24 heads of 128), 19 double + 38 single blocks, T5-XXL text
                  (4096 wide, 512 tokens), CLIP-L pooled vector (768), guidance 3.5; 16-channel latent
                  at 1/8 of the image, 2x2 patches (1024²: 4096 image tokens). 11.9B parameters.
  flux2-dev       FLUX.2-dev, comfy.supported_models.Flux2 / model_base.Flux2 (unet_config image_model
                  "flux2": global modulation, SwiGLU MLPs of ratio 3, no biases, RoPE axes [32,32,32,32]
                  theta 2000, txt_ids_dims [3], patch 1 on 128 latent channels at 1/16 of the image, so
                  1024² is a 64x64x128 latent = 4096 tokens; no pooled vector). Hidden 6144 (48 heads),
                  8 double + 48 single blocks, text 15360 wide (Mistral Small 3.x, 3 hidden-state layers
                  of 5120 stacked: comfy/text_encoders/flux.py Mistral3_24BModel layer=[10, 20, 30] and
                  Flux2TEModel's stack), 512 tokens (model_base.Flux2 pads the text to 512), guidance
                  embedder (guidance 4.0, BFL's default for dev). 32.2B parameters: 64 GB in bf16.
  flux2-klein-4b  FLUX.2 [klein] 4B: the same block types, hidden 3072 (24 heads), 5 double + 20 single,
                  text 7680 wide (Qwen3-4B, 3 x 2560: flux.py Qwen3_4BModel layer=[9, 18, 27],
                  llama.py Qwen3_4BConfig hidden_size 2560), no guidance embedder. 3.9B parameters.
  flux2-klein-9b  FLUX.2 [klein] 9B: hidden 4096 (32 heads), 8 double + 24 single, text 12288 wide
                  (Qwen3-8B, 3 x 4096: Qwen3_8BModel, Qwen3_8BConfig), no guidance embedder. 9.1B.
  Widths, depths, text widths and guidance_embed of the FLUX.2 models are black-forest-labs/flux2's
  src/flux2/model.py Flux2Params / Klein4BParams / Klein9BParams (use_guidance_embed True / False /
  False); everything else is what ComfyUI's model_detection.py sets for "flux2" (num_heads is hidden
  / 128 there). klein has no txt_norm (model_detection reads it from the keys; BFL's model has none).
  The klein models' text tokens are 512 too (KleinTokenizer pads to min_length 512).
Random weights are made on the GPU one tensor at a time, directly in the variant's storage dtype
(fp8 for core-fp8fast: no bf16 copy of the whole model), and kept on the GPU while it has room, else
in host memory; ComfyUI then copies them into its model as from a file. A variant that runs out of
memory (core-bf16 of flux2-dev on an 80 GB card may) becomes a failed row ("error") and the next
variant runs; a row ComfyUI could only load partially (lowvram: weights streamed each step) says so
(partially_loaded, weights_on_gpu_gb).

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
Needs a CUDA GPU for the real shapes; `--tiny` runs one double + one single block on the CPU (flux1-dev
at its full widths, as before; the FLUX.2 models at hidden 256 (2 heads of 128) and text width 384,
their block types and guidance embedder unchanged), e.g.
    COMFYUI_DIR=.host/ComfyUI .host/venv/bin/python -m bench.flux --tiny --model flux2-dev \
        --variants core-bf16,fbc-alternate --runs 1 --steps 4
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
import traceback
from dataclasses import dataclass

import torch

from bench import report as bench_report
from tests.support import flux_fixtures
from tests.support.cache_reports import CacheReportRecorder

TEXT_TOKENS = 512


@dataclass(frozen=True)
class ModelShape:
    """One --model: its widths and depths (sources in the module docstring)."""
    family: str  # "flux1" or "flux2"
    hidden_size: int
    depth: int
    depth_single_blocks: int
    context_in_dim: int
    guidance_embed: bool
    guidance: float = None  # the conditioning's guidance (None: the model has no guidance embedder)
    pooled_dim: int = None  # FLUX.1's CLIP-L pooled vector


MODELS = {
    "flux1-dev": ModelShape("flux1", 3072, 19, 38, 4096, True, guidance=3.5, pooled_dim=768),
    "flux2-dev": ModelShape("flux2", 6144, 8, 48, 15360, True, guidance=4.0),
    "flux2-klein-4b": ModelShape("flux2", 3072, 5, 20, 7680, False),
    "flux2-klein-9b": ModelShape("flux2", 4096, 8, 24, 12288, False),
}
# --tiny: one double + one single block. FLUX.1 keeps its widths (as this script always did); the
# FLUX.2 models shrink to hidden 256 (ComfyUI reads num_heads as hidden / 128) and text width 384.
TINY_FLUX2_HIDDEN, TINY_FLUX2_CONTEXT = 256, 384
# (threshold, max_consecutive_hits): 1e9 is above any relative change, so reuse follows the limit alone.
FBC_FIXED_PATTERNS = {
    "fbc-0": (0.0, 0),
    "fbc-alternate": (1e9, 1),
    "fbc-all": (1e9, 0),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI folder (default $COMFYUI_DIR)")
    parser.add_argument("--model", default="flux1-dev", choices=sorted(MODELS), help="the shapes (see above)")
    parser.add_argument("--variants", default="core-bf16,fbc-0,fbc-alternate,fbc-all,fbc-0.08,fbc-0.12")
    parser.add_argument("--resolutions", type=lambda text: [int(r) for r in text.split(",")], default=[1024],
                        help="comma list, e.g. 512,768,1024,1536: each variant is loaded once and sampled at each")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--passes", type=int, default=1, help="times the resolution list is sampled with each model")
    parser.add_argument("--tiny", action="store_true",
                        help="one double + one single block (FLUX.2: narrow too), for a CPU smoke run")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the results as a markdown table here")
    return parser.parse_args()


def model_shape(args):
    """(ModelShape, ComfyUI unet_config) of --model, shrunk under --tiny."""
    shape = MODELS[args.model]
    if args.tiny:
        if shape.family == "flux1":
            shape = ModelShape(**{**vars(shape), "depth": 1, "depth_single_blocks": 1})
        else:
            shape = ModelShape(**{**vars(shape), "depth": 1, "depth_single_blocks": 1,
                                  "hidden_size": TINY_FLUX2_HIDDEN, "context_in_dim": TINY_FLUX2_CONTEXT})
    if shape.family == "flux1":
        config = flux_fixtures.flux_dev_width_unet_config(shape.depth, shape.depth_single_blocks,
                                                          context_in_dim=shape.context_in_dim)
    else:
        config = flux_fixtures.flux2_unet_config(shape.hidden_size, shape.depth, shape.depth_single_blocks,
                                                 shape.context_in_dim, shape.guidance_embed)
    return shape, config


@torch.no_grad()
def fill_like_trained_(name, tensor, generator):
    """Weights N(0, fan_in^-1/2), biases 0, norm scales 1: unit-variance activations, like a trained net's."""
    if tensor.ndim >= 2:
        return tensor.normal_(0.0, tensor.shape[-1] ** -0.5, generator=generator)
    return tensor.zero_() if name.endswith("bias") else tensor.fill_(1.0)


def randomize_like_trained(model, generator):
    """Every parameter of `model` filled as fill_like_trained_ does (the seed anchor's diffusers model)."""
    for name, parameter in model.named_parameters():
        fill_like_trained_(name, parameter.data, generator)


def meta_model(config):
    """The model on the meta device: names and shapes of its weights, nothing allocated."""
    import comfy.ldm.flux.model
    import comfy.ops

    return comfy.ldm.flux.model.Flux(**config, dtype=torch.bfloat16, device="meta",
                                     operations=comfy.ops.disable_weight_init)


def random_state_dict(config, device, storage_dtype=None):
    """Random weights of the model, scaled like a trained net's: weights N(0, fan_in^-1/2), biases 0,
    norm scales 1 (unit-variance activations).

    Made one tensor at a time on `device` in bf16 (float32 on the CPU), in the order and with the
    generator of the model's parameters, so the values do not depend on where they are kept; each is
    then cast to `storage_dtype` (e.g. FP8: the whole model never exists in bf16) and kept on the GPU
    while it leaves GPU_SPARE_GIB free, else moved to host memory.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    storage_dtype = storage_dtype or dtype
    generator = torch.Generator(device=device).manual_seed(0)
    state_dict = {}
    with torch.no_grad():
        for name, parameter in meta_model(config).named_parameters():
            tensor = fill_like_trained_(name, torch.empty(parameter.shape, dtype=dtype, device=device), generator)
            tensor = tensor.to(storage_dtype)
            if device.type == "cuda" and torch.cuda.mem_get_info()[0] < GPU_SPARE_GIB * 2**30:
                tensor = tensor.cpu()
            state_dict[name] = tensor
    return state_dict


# Kept free on the GPU while making the weights (the largest FLUX.2-dev weight is 0.7 GB in bf16).
GPU_SPARE_GIB = 4


def load_model(state_dict, fp8):
    """ComfyUI's UNETLoader path (detection, its model built on the CPU, the weights copied in).

    Takes the caller's only reference to `state_dict`: ComfyUI pops its tensors while loading, so
    each copy of the weights is freed once it is in the model.
    """
    import comfy.sd

    options = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True} if fp8 else {}
    return comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=options)


def check_detected(model, config):
    """ComfyUI must have detected the shapes the model was made with (else the table would lie)."""
    params = vars(model.model.diffusion_model.params)
    wrong = {key: (params.get(key), value) for key, value in config.items()
             if key != "image_model" and params.get(key) != value}
    if type(model.model).__name__ != {"flux": "Flux", "flux2": "Flux2"}[config["image_model"]] or wrong:
        raise RuntimeError(f"ComfyUI detected {type(model.model).__name__} with {wrong} (detected, made)")


def conditioning(shape):
    """Random text states of the model's text width (FLUX.1: and a pooled vector); the negative zeros."""
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(1, TEXT_TOKENS, shape.context_in_dim, generator=generator)
    # guidance None: ComfyUI passes none (its Flux default 3.5 only where the key is missing).
    extra = {"guidance": shape.guidance}
    negative_extra = dict(extra)
    if shape.pooled_dim is not None:
        pooled = torch.randn(1, shape.pooled_dim, generator=generator)
        extra["pooled_output"], negative_extra["pooled_output"] = pooled, torch.zeros_like(pooled)
    return [[context, extra]], [[torch.zeros_like(context), negative_extra]]


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
    from fluxaccel.nodes.context_parallel.node import ContextParallel
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


def timed_sample(model, resolution, steps, shape):
    import nodes

    positive, negative = conditioning(shape)
    # FLUX.1: 16 channels at 1/8 of the image; FLUX.2: 128 channels at 1/16.
    latent_format = model.get_model_object("latent_format")
    side = resolution // latent_format.spacial_downscale_ratio
    latent = {"samples": torch.zeros(1, latent_format.latent_channels, side, side)}
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
    from fluxaccel.nodes.context_parallel.pool import active_pool
    from fluxaccel.nodes.context_parallel.messages import DeviceMemory

    pool = active_pool()
    if pool is None:
        return []
    return [[round(value / 2**30, 2) for value in answer] for answer in pool.ask(DeviceMemory(reset))]


def measure(model, resolution, args, shape, reference):
    """Warm-up run, then `args.runs` timed runs of one model at one resolution."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        worker_memory(reset=True)
    first_seconds, _, first_recorder = timed_sample(model, resolution, args.steps, shape)
    timings = [timed_sample(model, resolution, args.steps, shape) for _ in range(args.runs)]
    seconds = sorted(t for t, _, _ in timings)
    _, samples, recorder = timings[-1]
    row = {
        "resolution": resolution,
        "median_s": round(seconds[len(seconds) // 2], 3),
        "times_s": [round(t, 3) for t in seconds],
        "first_run_s": round(first_seconds, 2),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        # ComfyUI's size of the weights, and whether it left some in host memory (a partial, lowvram
        # load: those stream to the GPU every step) with how much it loaded.
        "weights_gb": round(model.model_size() / 2**30, 2),
        "partially_loaded": bool(getattr(model.model, "model_lowvram", False)),
        "weights_on_gpu_gb": round(model.loaded_size() / 2**30, 2) if torch.cuda.is_available() else None,
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


def is_out_of_memory(error):
    """A CUDA (or host) out-of-memory error, also where a compiler or a node wrapped it in its own."""
    while error is not None:
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def run_variant(config, shape, variant, args, references):
    """Rows of one variant over the resolutions; the first variant's samples become the references.

    A variant that raises (out of memory, say) gets a failed row ("error") for each resolution it did
    not measure, and is unloaded like one that ran, so the next variant starts on an empty GPU.
    """
    import comfy.model_management

    rows = []
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        storage_dtype = torch.float8_e4m3fn if "fp8fast" in variant else None
        model = load_model(random_state_dict(config, device, storage_dtype), fp8="fp8fast" in variant)
        comfy.model_management.soft_empty_cache()
        check_detected(model, config)
        model = apply_variant(model, variant)
        for sweep_pass in range(1, args.passes + 1):
            for resolution in args.resolutions:
                row, samples = measure(model, resolution, args, shape, references.get(resolution))
                references.setdefault(resolution, samples)
                rows.append({"variant": variant, "model": args.model, "pass": sweep_pass, **row})
                print(json.dumps(rows[-1]), flush=True)
    except Exception as caught:  # noqa: BLE001 - recorded as a failed row, the other variants still run
        out_of_memory = is_out_of_memory(caught)
        error = f"{'out of memory: ' if out_of_memory else ''}{type(caught).__name__}: {str(caught).splitlines()[0][:200]}"
        traceback.print_exc()
        # (Leaving this block drops the error, whose traceback's frames hold the model and activations.)
        measured = {(row["pass"], row["resolution"]) for row in rows}
        for sweep_pass in range(1, args.passes + 1):
            for resolution in args.resolutions:
                if (sweep_pass, resolution) not in measured:
                    rows.append({"variant": variant, "model": args.model, "pass": sweep_pass,
                                 "resolution": resolution, "error": error, "out_of_memory": out_of_memory})
                    print(json.dumps(rows[-1]), flush=True)
    model = None
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
    return (f"{report['model']}{' (tiny)' if report['tiny'] else ''} shapes, {report['device']}, "
            f"torch {report['torch']}, {report['steps']} steps, "
            f"{report['blocks'][0]} double + {report['blocks'][1]} single blocks, batch 1")


def main():
    args = parse_args()
    flux_fixtures.use_comfyui(args.comfyui)
    flux_fixtures.import_pack()
    import comfy.utils
    import comfyui_version

    comfy.utils.PROGRESS_BAR_ENABLED = False
    shape, config = model_shape(args)
    report = {
        "model": args.model, "tiny": args.tiny,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "comfyui": comfyui_version.__version__,
        "steps": args.steps, "blocks": [shape.depth, shape.depth_single_blocks],
        "unet_config": config,
        "parameters_b": round(sum(p.numel() for p in meta_model(config).parameters()) / 1e9, 3),
        "text_tokens": TEXT_TOKENS, "rows": [],
    }
    title, references = report_title(report), {}
    for variant in args.variants.split(","):
        report["rows"] += run_variant(config, shape, variant, args, references)
        bench_report.update_report(report, title, args.out, args.markdown)
    print(bench_report.markdown_table(report, title))
    # Data of the other variants is written either way; a failure other than running out of memory
    # (the expected limit of a big model) is a bug to look at, so the exit status says so.
    if any("error" in row and not row.get("out_of_memory") for row in report["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
