"""How far FP8 moves a trained FLUX's images: the pack's FP8 Dynamic Quantize beside ComfyUI core's
fp8_e4m3fn_fast, against the same model in fp32 and in bf16.

The model is the trained tiny FLUX of bench/fidelity/caches.py (ComfyUI's own FLUX classes), sampled by
ComfyUI's KSampler node at 28 steps for the same prompts and seeds as docs/FIDELITY.md. Variants:
- fp32 (the full-precision reference) and bf16 (the model FP8 is applied to, the second reference);
- pack FP8, FP8 tensor-core path: the node on the bf16 model with its W8A8 path (per-row weight
  scales, per-token activation scales, torch._scaled_mm). torch._scaled_mm also runs on the CPU
  (tests/test_kernels_fp8.py checks it against float64), so on a CPU this is the GPU path's math;
- pack FP8, weight-only: what the node does without FP8 tensor cores;
- pack FP8 with every linear layer quantized: an ablation (not an option of the node) that also
  quantizes the input embedders and the final layer the node keeps, as core's fp8 does;
- core fp8_e4m3fn_fast: the model built with ComfyUI's own fp8_ops layers and e4m3 weights with a
  scale of 1 (as Load Diffusion Model's weight_dtype fp8_e4m3fn_fast loads it), compute in bf16.
  Its layers fall back to weight-only where their FP8 matmul cannot run; the run counts which ran.

    python -m bench.fidelity.fp8                # prints the table
    python -m bench.fidelity.fp8 --write-docs   # and writes its raw JSON in docs/results and docs/FIDELITY-FP8.md from it
"""
import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch

from bench.fidelity import caches as fidelity
from bench.fidelity import train_tiny_flux

DOCS_PATH = os.path.join(fidelity.PACK_DIR, "docs", "FIDELITY-FP8.md")
FP32 = "fp32"
BF16 = "bf16"
REFERENCES = (FP32, BF16)
PACK_TENSOR_CORES = "pack FP8, FP8 tensor-core path (W8A8, per-row/per-token scales)"
PACK_WEIGHT_ONLY = "pack FP8, weight-only (no FP8 tensor cores)"
PACK_EVERY_LAYER = "pack FP8 W8A8 with every linear layer quantized (ablation)"
CORE_FP8_FAST = "core fp8_e4m3fn_fast (scale 1)"
FP8_VARIANTS = (PACK_TENSOR_CORES, PACK_WEIGHT_ONLY, PACK_EVERY_LAYER, CORE_FP8_FAST)


def shapes_model_as(model: fidelity.ShapesModel, weight_dtype, compute_dtype, operations=None):
    """The trained model rebuilt with other weight and compute dtypes (and layer classes), in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import safetensors

    with safetensors.safe_open(model.path, framework="pt") as f:
        state_dict = {name: f.get_tensor(name).float() for name in f.keys()}
    model_config = comfy.supported_models.Flux(json.loads(model.metadata["unet_config"]))
    model_config.set_inference_dtype(weight_dtype, compute_dtype)
    model_config.custom_operations = operations
    base_model = model_config.get_model({})
    base_model.diffusion_model.load_state_dict(state_dict, strict=True)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base_model, load_device=device, offload_device=device)


def pack_fp8(patcher, keep_sensitive_layers=True):
    from fluxaccel.nodes import flux_layout
    from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize

    kept = flux_layout.FP8_SENSITIVE_LAYERS if keep_sensitive_layers else ()
    with mock.patch.object(flux_layout, "FP8_SENSITIVE_LAYERS", kept):
        return FP8DynamicQuantize.execute(patcher, "per-row", "").result[0]


def variant_patchers(model: fidelity.ShapesModel, names):
    """{name: (patcher, fp8_tensor_cores)} of the named variants, each built from the trained model."""
    import comfy.ops

    bf16 = shapes_model_as(model, torch.bfloat16, None)
    builders = {
        FP32: lambda: (model.patcher, False),
        BF16: lambda: (bf16, False),
        PACK_TENSOR_CORES: lambda: (pack_fp8(bf16), True),
        PACK_WEIGHT_ONLY: lambda: (pack_fp8(bf16), False),
        PACK_EVERY_LAYER: lambda: (pack_fp8(bf16, keep_sensitive_layers=False), True),
        CORE_FP8_FAST: lambda: (shapes_model_as(model, torch.float8_e4m3fn, torch.bfloat16, comfy.ops.fp8_ops), False),
    }
    return {name: builders[name]() for name in names}


def sample_all(patcher, cases, world, steps, fp8_tensor_cores=False):
    """Every case's latent; with fp8_tensor_cores, the pack's kernels take their FP8 matmul path here."""
    from fluxaccel.kernels.fp8 import quantize as fp8

    with mock.patch.object(fp8, "fp8_matmul_supported", lambda device: True) if fp8_tensor_cores else contextlib.nullcontext():
        return {case: fidelity.ksample(patcher, *case, world, steps).float() for case in cases}


@contextlib.contextmanager
def counting_core_fp8_layer_calls():
    """Counts core fp8_ops layer calls by what ran: its W8A8 path (`comfy.ops.fp8_linear` returned the
    output) or its weight-only fallback (fp8_linear returned None or raised, and the layer ran a plain
    linear on the weight cast to the compute dtype)."""
    import comfy.ops

    counts = {"w8a8": 0, "weight_only": 0}
    w8a8_layer = comfy.ops.fp8_linear

    def counted(layer, input):
        try:
            output = w8a8_layer(layer, input)
        except Exception:
            counts["weight_only"] += 1
            raise
        counts["w8a8" if output is not None else "weight_only"] += 1
        return output

    with mock.patch.object(comfy.ops, "fp8_linear", counted):
        yield counts


def compare(latents, references):
    """PSNR and SSIM of each case's latent against its reference, in the references' case order."""
    psnrs = [fidelity.psnr(latents[case], reference) for case, reference in references.items()]
    ssims = [fidelity.ssim(latents[case], reference) for case, reference in references.items()]
    return {"mean_psnr_db": round(statistics.fmean(psnrs), 2), "min_psnr_db": round(min(psnrs), 2),
            "mean_ssim": round(statistics.fmean(ssims), 5),
            "psnr_db": [round(p, 2) for p in psnrs], "ssim": [round(s, 5) for s in ssims]}


def error_ratio(variant, baseline):
    """variant's latent error as a multiple of baseline's against the same reference: the geometric mean
    over cases of the RMS error ratio (the reference is the same per case, so its PSNR peak cancels)."""
    return round(10 ** ((baseline["mean_psnr_db"] - variant["mean_psnr_db"]) / 20), 3)


def measure(model: fidelity.ShapesModel, cases, steps, variants=FP8_VARIANTS):
    """Each variant (and bf16) against fp32's and bf16's latents of the same case, the pack's FP8 error as a
    multiple of core's, and how core's fp8 layers ran (the raw JSON's `variants`, `pack_to_core_error` and
    `core_fp8_layer_calls`)."""
    patchers = variant_patchers(model, REFERENCES + tuple(variants))
    latents, core_calls = {}, None
    for name, (patcher, tensor_cores) in patchers.items():
        if name == CORE_FP8_FAST:
            with counting_core_fp8_layer_calls() as core_calls:
                latents[name] = sample_all(patcher, cases, model.world, steps)
        else:
            latents[name] = sample_all(patcher, cases, model.world, steps, tensor_cores)
    compared = {name: {f"vs_{reference}": compare(latents[name], latents[reference])
                       for reference in REFERENCES if reference != name}
                for name in (BF16, *variants)}
    results = {"variants": compared, "core_fp8_layer_calls": core_calls}
    if PACK_TENSOR_CORES in variants and CORE_FP8_FAST in variants:
        results["pack_to_core_error"] = {
            f"vs_{reference}": error_ratio(compared[PACK_TENSOR_CORES][f"vs_{reference}"],
                                           compared[CORE_FP8_FAST][f"vs_{reference}"]) for reference in REFERENCES}
    return results


def results_json(results, model: fidelity.ShapesModel, command, cases, steps, seconds):
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": fidelity.device_description(), "seconds": round(seconds),
        "pack": fidelity.pack_revision(fidelity.PACK_DIR),
        "model": {"path": os.path.relpath(model.path, fidelity.PACK_DIR), "description": model.describe()},
        "cases": [{"prompt": condition.prompt(), "seed": seed} for condition, seed in cases], "steps": steps,
        "metrics": "PSNR with the peak at the reference latent's dynamic range (max - min); SSIM with a Gaussian "
                   f"window of {fidelity.SSIM_WINDOW} px, sigma {fidelity.SSIM_SIGMA}, per channel, averaged; "
                   "error ratio: geometric mean over cases of the RMS latent error ratio",
        **results,
    }


def core_calls_sentence(calls):
    if calls is None:
        return "core fp8_e4m3fn_fast was not run"
    if calls["weight_only"] == 0:
        return (f"all {calls['w8a8']:,} of core fp8_e4m3fn_fast's layer calls ran its W8A8 path (activations "
                "clamped to ±448 and cast to e4m3 with scale 1), none its weight-only fallback")
    return (f"core fp8_e4m3fn_fast's layer calls: {calls['w8a8']:,} ran its W8A8 path, {calls['weight_only']:,} "
            "its weight-only fallback (weight cast to bf16, activations unquantized)")


def render(results, results_name):
    """docs/FIDELITY-FP8.md from the raw JSON (`results_json`)."""
    variants = results["variants"]
    lines = [
        "# FP8 fidelity on a trained FLUX",
        "",
        "How far FP8 moves a trained FLUX's samples from the same model in fp32 and in bf16. Generated by",
        "`bench/fidelity/fp8.py` from its raw JSON "
        f"([docs/results/{results_name}](results/{results_name})); every number below is measured by that run.",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}",
        f"- Device: {results['device']}; the run took {results['seconds']} s",
        f"- Pack: {results['pack']}",
        f"- Model: `{results['model']['path']}`, {results['model']['description']}.",
        f"- Sampling: ComfyUI's KSampler node, {results['steps']} steps, Euler, \"simple\", cfg 1, FLUX guidance 3.5; "
        f"{len(results['cases'])} cases (the prompts and seeds of docs/FIDELITY.md).",
        "- The pack's FP8 tensor-core path is run on the CPU with torch._scaled_mm, the same math as on a GPU "
        "(checked against float64 in tests/test_kernels_fp8.py), except that on a GPU the layers called on one row "
        "(the modulations) read their FP8 weight with the row unquantized, as the weight-only path does. "
        "Core's fp8_e4m3fn_fast runs its own fp8_ops layers: in this run " + core_calls_sentence(
            results["core_fp8_layer_calls"]) + ".",
        f"- Metrics: {results['metrics']}. The FP8 variants are applied to the bf16 model, so against fp32 their "
        "error includes bf16's own.",
        "",
        "| variant | vs fp32: mean PSNR (dB) | min PSNR (dB) | mean SSIM | vs bf16: mean PSNR (dB) | min PSNR (dB) | mean SSIM |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, against in variants.items():
        cells = []
        for reference in REFERENCES:
            metrics = against.get(f"vs_{reference}")
            cells += (["(reference)"] * 3 if metrics is None else
                      [f"{metrics['mean_psnr_db']:.1f}", f"{metrics['min_psnr_db']:.1f}", f"{metrics['mean_ssim']:.4f}"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = results.get("pack_to_core_error")
    if ratios is not None:
        lines += ["", f"The pack's FP8 tensor-core path leaves {ratios['vs_bf16']:.2f}x the latent error of core's "
                  f"fp8_e4m3fn_fast against bf16, and {ratios['vs_fp32']:.2f}x against fp32, where bf16's own "
                  f"{variants[BF16]['vs_fp32']['mean_psnr_db']:.1f} dB dominates both (geometric mean over cases of "
                  "the RMS error ratio). The ablation row separates the two causes: the dynamic scales alone, with "
                  "every layer quantized as core does, and the layers the node keeps in the model's dtype. "
                  "tests/test_fidelity.py checks the claims on held-out seeds."]
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the raw JSON in docs/results and {os.path.relpath(DOCS_PATH, fidelity.PACK_DIR)}")
    parser.add_argument("--steps", type=int, default=fidelity.STEPS)
    args = parser.parse_args(argv)

    fidelity.setup_comfyui()
    torch.set_num_threads(train_tiny_flux.THREADS)
    started = time.time()
    model = fidelity.load_shapes_model()
    cases = fidelity.cases_of(fidelity.spread_conditions(fidelity.DEFAULT_CONDITION_COUNT), fidelity.DEFAULT_SEEDS)
    command = ("python -m bench.fidelity.fp8 " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    results = results_json(measure(model, cases, args.steps), model, command, cases, args.steps, time.time() - started)
    results_name = fidelity.dated_results_name("fp8-fidelity")
    text = render(results, results_name)
    print(text)
    if args.write_docs:
        with open(os.path.join(fidelity.RESULTS_DIR, results_name), "w") as f:
            json.dump(results, f, indent=1)
        with open(DOCS_PATH, "w") as f:
            f.write(text)
        print(f"wrote docs/results/{results_name} and {DOCS_PATH}")


if __name__ == "__main__":
    main()
