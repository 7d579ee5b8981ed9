"""The "seed system" anchor: ParaAttention's published FLUX recipe, timed outside ComfyUI.

The pack's own numbers come from `bench/flux.py` (real ComfyUI). This script times the
recipe ParaAttention publishes for FLUX.1-dev (First Block Cache, then torchao fp8 dynamic
quantization, then torch.compile) on diffusers' FluxTransformer2DModel, on the same GPU and with the
same conventions, and writes the same report (bench/report.py: one row per variant and
resolution), so both JSONs tabulate together.

What is timed: FLUX.1-dev shapes (hidden 3072, 19 double + 38 single blocks, 512 text tokens of
width 4096, pooled 768, guidance 3.5), random weights in bf16, batch 1, a 28-step Euler
flow-matching loop at 1024² (4096 packed image tokens of width 64) with the FLUX.1-dev pipeline's
sigmas: linspace(1, 1/28, 28) time-shifted with mu = calculate_shift(4096 tokens) = 1.15
(exponential shift, as FluxPipeline + FlowMatchEulerDiscreteScheduler do), then 0. Only the
transformer loop is timed: no text encoders, no VAE (bench/flux.py times no encoders either).
Each variant: a fresh model, one warm-up run (its time is *first run*: includes compilation), then
`--runs` timed runs (median reported). JSON and markdown are rewritten after every variant and each
result is printed as soon as it is done, so a run cut off by a time limit still leaves data.

    source scripts/device_bootstrap.sh && python3 -m bench.seed_anchor \\
        --variants eager,fbc-0,fbc-all,fbc-0.12,fp8dq+compile,fbc-0.12+fp8dq+compile \\
        --out $OUT/anchor.json --markdown $OUT/anchor.md
    python -m bench.seed_anchor --tiny        # CPU smoke run: eager,fbc-0,fbc-all

Variants are "+"-joined parts, applied in ParaAttention's order (cache, then quantize, then compile):
  eager                 plain bf16 transformer
  fbc-<threshold>       para-attn First Block Cache at that residual-diff threshold (random
                        weights: the skip ratio says little about a trained model)
  fbc-0                 the cache's hooks with nothing reused: cost of a computed step
  fbc-all               a threshold above any difference: one computed step, the rest reused
  fp8dq                 torchao Float8DynamicActivationFloat8WeightConfig (row-wise by default)
  compile               torch.compile of the transformer (`--compile-mode`, default mode)
e.g. fp8dq+compile, fbc-0.12+fp8dq+compile (the full seed recipe), compile (bf16 + compile).

Budget measured on one H100 (2026-11-23): the four eager variants about 1.5 min together;
fp8dq+compile with torchao's own inductor settings did not finish compiling within 8 minutes, with
--no-torchao-inductor-config its first run (mostly compilation) took 156 s. Run compiled variants
in their own call, starting with `eager` (the speedup reference).

Needs diffusers (0.42.1 used) and para-attn (0.3.38) for fbc-*, torchao (0.17) for fp8dq. On the
lent GPU, where ComfyUI is not needed and lab/ with the repository is over a call's 64 MiB, carry
lab/whl-anchor, lab/whl and lab/stubs (not ComfyUI.tgz) and install them instead of the bootstrap:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site lab/whl-anchor/*.whl \
        lab/whl/torchao-*.whl lab/whl/para_attn-*.whl && export PYTHONPATH=/tmp/site:lab/stubs
"""
import argparse
import functools
import gc
import inspect
import json
import math
import sys
import time
import traceback
from contextlib import nullcontext

import torch

from bench import report as bench_report
from bench.flux import randomize_like_trained

FLUX_DEV_CONFIG = dict(
    in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# One block of each kind and 2 heads (hidden 256): small enough for a CPU smoke run next to other work.
TINY_CONFIG = dict(FLUX_DEV_CONFIG, num_layers=1, num_single_layers=1, num_attention_heads=2)

# Fixed-work cache variants, to time computed and reused steps independently of the random weights.
# Threshold 0: para-attn never compares (get_can_use_cache returns False). 1e9: every relative
# difference is below it, so every step after the first (which has nothing to compare to) reuses.
FBC_FIXED_THRESHOLDS = {"fbc-0": 0.0, "fbc-all": 1e9}

DEFAULT_VARIANTS = "eager,fbc-0,fbc-all,fbc-0.12,fp8dq+compile,fbc-0.12+fp8dq+compile"
TINY_VARIANTS = "eager,fbc-0,fbc-all"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None, help=f"comma list (default {DEFAULT_VARIANTS}; "
                                                         f"with --tiny {TINY_VARIANTS})")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 28)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode; ParaAttention's README uses max-autotune-no-cudagraphs, which did "
                             "not finish compiling within 9 minutes on an H100 with fp8, so default mode here")
    parser.add_argument("--fp8-granularity", choices=["row", "tensor"], default="row",
                        help="fp8dq scales per row (better accuracy on sm89+) or per tensor (torchao's default, "
                             "what ParaAttention's README gets by calling the config with no arguments)")
    parser.add_argument("--no-torchao-inductor-config", action="store_true",
                        help="pass set_inductor_config=False: keep inductor's defaults instead of torchao's "
                             "coordinate-descent tuning (shorter compile, no longer the recipe as published)")
    parser.add_argument("--tiny", action="store_true",
                        help="1 double + 1 single block, 2 heads, 64² image, 2 steps, float32 on the CPU")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rewritten after each variant)")
    parser.add_argument("--markdown", default=None, help="write the results as a markdown table here")
    args = parser.parse_args()
    args.variants = args.variants or (TINY_VARIANTS if args.tiny else DEFAULT_VARIANTS)
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 28)
    return args


# ----------------------------------------------------------------------------------------------
# Model and inputs


def build_transformer(config, device, dtype, seed=0):
    """FluxTransformer2DModel with random weights scaled like a trained net's (unit-variance activations).

    Built on the meta device and materialized once on `device`, so the 12B parameters are never
    initialized twice nor held in float32. Randomized as bench/flux.py's weights are (its
    randomize_like_trained). Every variant calls this with the same seed and gets the same weights.
    """
    from diffusers import FluxTransformer2DModel

    # Default dtype rather than model.to(dtype): no float32 copy, and no diffusers warning about
    # casting with to() (FLUX keeps no modules in float32 anyway).
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model = model.to_empty(device=device)
    assert not list(model.buffers()), "to_empty leaves buffers uninitialized: this model was assumed to have none"
    randomize_like_trained(model, torch.Generator(device=device).manual_seed(seed))
    return model.eval().requires_grad_(False)


def flux_dev_sigmas(steps, image_tokens):
    """FluxPipeline's schedule for FLUX.1-dev: linspace(1, 1/steps), exponential time shift, then 0."""
    # calculate_shift with FLUX.1-dev's scheduler config (base 256 tokens -> 0.5, max 4096 -> 1.15).
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = 0.5 + slope * (image_tokens - 256)
    linear = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    shifted = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in linear]
    return shifted + [0.0]


def latent_image_ids(resolution):
    """FluxPipeline._prepare_latent_image_ids: (row, column) of each 2x2-packed latent patch."""
    side = resolution // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    return ids.reshape(side * side, 3)


def sampling_inputs(config, args, device, dtype):
    """Fixed noise and conditioning (same for every variant), shaped as FluxPipeline passes them."""
    image_tokens = (args.resolution // 16) ** 2
    generator = torch.Generator().manual_seed(1)
    sigmas = flux_dev_sigmas(args.steps, image_tokens)
    inputs = {
        "noise": torch.randn(1, image_tokens, config["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=generator),
        "img_ids": latent_image_ids(args.resolution),
        "txt_ids": torch.zeros(args.text_tokens, 3),  # FluxPipeline: text positions are all zero
    }
    inputs = {name: t.to(device=device, dtype=torch.float32 if name == "noise" else dtype) for name, t in inputs.items()}
    # FluxPipeline: guidance in float32, timestep = sigma in the latents' dtype (the model scales both by 1000).
    inputs["guidance"] = torch.full([1], args.guidance, device=device, dtype=torch.float32)
    # Made before timing, so the loop itself does no host-to-device copies.
    inputs["timesteps"] = [torch.full([1], s, device=device, dtype=dtype) for s in sigmas[:-1]]
    inputs["step_sizes"] = [after - before for before, after in zip(sigmas[:-1], sigmas[1:])]
    return inputs


# ----------------------------------------------------------------------------------------------
# First Block Cache (para-attn)


class ReuseCounter:
    """Counts para-attn's per-step cache decisions; para-attn exposes no counter of its own."""

    reused = 0
    decisions = 0

    @classmethod
    def reset(cls):
        cls.reused = cls.decisions = 0


@functools.lru_cache(maxsize=None)
def install_reuse_counter():
    """Wraps para_attn.first_block_cache.utils.get_can_use_cache (inside this benchmark only).

    CachedTransformerBlocks.forward looks the function up in that module's globals at each call,
    once per model forward, right after the first block: its answer is the step's reuse decision.
    The wrapper stays compiler-disabled like the original, so under torch.compile it still runs
    eagerly, once per step.
    """
    from para_attn.first_block_cache import utils

    original = utils.get_can_use_cache

    @torch.compiler.disable
    @functools.wraps(original)
    def counted_get_can_use_cache(*args, **kwargs):
        can_use_cache = original(*args, **kwargs)
        ReuseCounter.decisions += 1
        ReuseCounter.reused += int(bool(can_use_cache))
        return can_use_cache

    utils.get_can_use_cache = counted_get_can_use_cache


class ConcatenatedStreamSingleBlock(torch.nn.Module):
    """Lets para-attn 0.3.38 call diffusers >= 0.35 single blocks (ParaAttention issue #49).

    para-attn still calls single blocks the pre-0.35 way: block(text+image stream, temb=...,
    image_rotary_emb=..., joint_attention_kwargs=...) -> stream. diffusers 0.35 moved the
    concatenation into the block: block(image, text, temb, ...) -> (text, image). Giving the block
    an empty text part makes its own cat/split leave the stream whole: same math and the same one
    concatenation per block as the unpatched model.
    """

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        _, hidden_states = self.block(hidden_states=hidden_states, encoder_hidden_states=hidden_states[:, :0], temb=temb,
                                      image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        return hidden_states


def single_blocks_take_text_separately(transformer):
    block = transformer.single_transformer_blocks[0]
    return "encoder_hidden_states" in inspect.signature(type(block).forward).parameters


def apply_first_block_cache(transformer):
    """para-attn's FLUX adapter, as apply_cache_on_pipe applies it to pipe.transformer."""
    from para_attn.first_block_cache.diffusers_adapters.flux import apply_cache_on_transformer

    install_reuse_counter()
    if single_blocks_take_text_separately(transformer):
        # In place: the adapter keeps a reference to this very ModuleList.
        blocks = transformer.single_transformer_blocks
        for index in range(len(blocks)):
            blocks[index] = ConcatenatedStreamSingleBlock(blocks[index])
    return apply_cache_on_transformer(transformer)


def cache_scope(threshold):
    """The cache context apply_cache_on_pipe opens around each pipeline call (fresh buffers per image)."""
    if threshold is None:
        return nullcontext()
    from para_attn.first_block_cache import utils

    return utils.cache_context(utils.create_cache_context(residual_diff_threshold=threshold))


# ----------------------------------------------------------------------------------------------
# Quantization and compilation


def apply_fp8_dynamic_quant(transformer, args):
    """torchao fp8 dynamic activation + fp8 weight on every Linear (what the recipe does to the transformer)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    granularity = PerRow() if args.fp8_granularity == "row" else PerTensor()
    # set_inductor_config (default True) also switches on torchao's recommended inductor settings
    # (coordinate-descent tuning, ...), process-wide: the recipe gets them the same way.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity,
                                                       set_inductor_config=not args.no_torchao_inductor_config)
    quantize_(transformer, config)
    return transformer


def compile_transformer(transformer, args):
    mode = None if args.compile_mode == "default" else args.compile_mode
    return torch.compile(transformer, mode=mode)


def parse_variant(variant):
    """'fbc-0.12+fp8dq+compile' -> (threshold or None, fp8dq?, compile?)."""
    threshold, fp8dq, compiled = None, False, False
    for part in variant.split("+"):
        if part in FBC_FIXED_THRESHOLDS:
            threshold = FBC_FIXED_THRESHOLDS[part]
        elif part.startswith("fbc-"):
            threshold = float(part[len("fbc-"):])
        elif part == "fp8dq":
            fp8dq = True
        elif part == "compile":
            compiled = True
        elif part != "eager":
            raise ValueError(f"unknown variant part {part!r} in {variant!r}")
    return threshold, fp8dq, compiled


def prepare_variant(transformer, variant, args):
    """ParaAttention's order: apply_cache_on_pipe, then quantize_, then torch.compile (their README)."""
    threshold, fp8dq, compiled = parse_variant(variant)
    if threshold is not None:
        transformer = apply_first_block_cache(transformer)
    if fp8dq:
        transformer = apply_fp8_dynamic_quant(transformer, args)
    if compiled:
        transformer = compile_transformer(transformer, args)
    return transformer, threshold


# ----------------------------------------------------------------------------------------------
# Timing


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def sample(transformer, inputs, threshold, dtype):
    """One Euler flow-matching run (FlowMatchEulerDiscreteScheduler.step: x += (sigma_next - sigma) * v)."""
    latents = inputs["noise"].clone()
    with cache_scope(threshold):
        for timestep, step_size in zip(inputs["timesteps"], inputs["step_sizes"]):
            velocity = transformer(
                hidden_states=latents.to(dtype), timestep=timestep, guidance=inputs["guidance"],
                pooled_projections=inputs["pooled_projections"], encoder_hidden_states=inputs["encoder_hidden_states"],
                txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"], return_dict=False,
            )[0]
            latents = latents + step_size * velocity.float()  # the scheduler steps in float32 too
    return latents


def timed_sample(transformer, inputs, threshold, dtype):
    ReuseCounter.reset()
    synchronize()
    started = time.perf_counter()
    latents = sample(transformer, inputs, threshold, dtype)
    synchronize()
    return time.perf_counter() - started, latents.cpu(), ReuseCounter.reused


def run_variant(variant, config, inputs, args, device, dtype, reference):
    transformer, threshold = prepare_variant(build_transformer(config, device, dtype), variant, args)
    # Peak from here on: resident weights (fp8 after quantize_) plus sampling, compilation included;
    # building random bf16 weights before quantizing is this benchmark's set-up, not the recipe's.
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    first_seconds, _, _ = timed_sample(transformer, inputs, threshold, dtype)
    timings = [timed_sample(transformer, inputs, threshold, dtype) for _ in range(args.runs)]
    seconds = sorted(t for t, _, _ in timings)
    _, latents, steps_reused = timings[-1]
    result = {
        "median_s": round(seconds[len(seconds) // 2], 3),
        "times_s": [round(t, 3) for t in seconds],
        "first_run_s": round(first_seconds, 2),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "steps_reused": steps_reused,
        "rel_error_vs_first_variant": None if reference is None else
        round(((latents - reference).norm() / reference.norm()).item(), 4),
    }
    return result, latents


def release_memory():
    """Drops the previous variant's model, compiled graphs and cached CUDA blocks before the next one."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Report


def package_version(name):
    try:
        import importlib.metadata

        return importlib.metadata.version(name)
    except Exception:
        return None


def report_metadata(args, config):
    return {
        "system": "ParaAttention seed recipe on diffusers FluxTransformer2DModel (outside ComfyUI)",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"), "para_attn": package_version("para-attn"),
        "torchao": package_version("torchao"),
        "steps": args.steps, "text_tokens": args.text_tokens,
        "blocks": [config["num_layers"], config["num_single_layers"]],
        "sigmas": "FLUX.1-dev FluxPipeline: linspace(1, 1/steps) exponential-shifted by calculate_shift, then 0",
        "compile_mode": args.compile_mode, "fp8_granularity": args.fp8_granularity,
        "torchao_inductor_config": not args.no_torchao_inductor_config,
        "rows": [],
    }


def report_title(report):
    return (f"{report['system']}: {report['device']}, torch {report['torch']}, diffusers {report['diffusers']}, "
            f"para-attn {report['para_attn']}, torchao {report['torchao']}; {report['steps']} Euler steps, "
            f"{report['blocks'][0]} double + {report['blocks'][1]} single blocks, batch 1, "
            f"compile mode {report['compile_mode']}, fp8 per {report['fp8_granularity']}")


def main():
    args = parse_args()
    if args.tiny:
        config, device, dtype = TINY_CONFIG, torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        config, device, dtype = FLUX_DEV_CONFIG, torch.device("cuda"), torch.bfloat16
    else:
        sys.exit("FLUX.1-dev shapes need a CUDA GPU; use --tiny for a CPU smoke run")
    inputs = sampling_inputs(config, args, device, dtype)
    report = report_metadata(args, config)
    title, reference, started = report_title(report), None, time.perf_counter()
    for variant in args.variants.split(","):
        row = {"variant": variant, "resolution": args.resolution}
        try:
            result, latents = run_variant(variant, config, inputs, args, device, dtype, reference)
            row.update(result)
            reference = latents if reference is None else reference
        except Exception as error:  # one failed variant (e.g. a compile error) must not lose the others
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        release_memory()
        report["rows"].append(row)
        bench_report.update_report(report, title, args.out, args.markdown)
        print(f"[{time.perf_counter() - started:.0f} s] {variant} {json.dumps(row)}", flush=True)
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
