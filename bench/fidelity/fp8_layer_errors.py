"""FP8 error per linear layer and per block against bf16: the pack's FP8 Dynamic Quantize beside
ComfyUI core's fp8_e4m3fn_fast, on the same weights and the same inputs.

A FLUX.1-dev-shaped model (random weights scaled like a trained net's, see bench/flux.py) is loaded
three times in real ComfyUI: bf16, bf16 under FP8 Dynamic Quantize, and as core loads it for
fp8_e4m3fn_fast. One bf16 forward at the given resolution (512 text tokens) records every block's
inputs. Each block then runs on those inputs in the three models (per-block error), and while the
bf16 block runs, each of its linear layers' inputs also goes through the same layer of the two FP8
models (per-layer error). Error = ||y - y_bf16|| / ||y_bf16||. Random deep nets amplify any
difference from block to block, so whole-model errors are reported for reference only.

    python -m bench.fidelity.fp8_layer_errors --out errors.json --markdown errors.md     (needs an FP8 GPU)

With --trained, the same comparison runs on the trained tiny FLUX of bench/fidelity/caches.py (real
prompt conditioning, 16x16 latents) on the CPU, where the pack's FP8 tensor-core path runs with
torch._scaled_mm's CPU implementation (the same math; tests/test_kernels_fp8.py) and core's
fp8_e4m3fn_fast with its own fp8_ops layers.
"""
import argparse
import contextlib
import json
import os
import re
import statistics
from unittest import mock

import torch

import bench_flux
from tests.support import flux_fixtures


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI folder (default $COMFYUI_DIR)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="one double + one single block, for a CPU smoke run")
    parser.add_argument("--trained", action="store_true", help="the trained tiny FLUX of bench/fidelity/caches.py, on the CPU")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the tables as markdown here")
    return parser.parse_args()


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def cloned(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: cloned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cloned(item) for item in value)
    return value


def flux_blocks(diffusion_model):
    return ([(f"double_blocks.{i}", block) for i, block in enumerate(diffusion_model.double_blocks)]
            + [(f"single_blocks.{i}", block) for i, block in enumerate(diffusion_model.single_blocks)])


def model_inputs(resolution, device):
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 16, resolution // 8, resolution // 8, generator=generator)
    context = torch.randn(1, bench_flux.TEXT_TOKENS, 4096, generator=generator)
    pooled = torch.randn(1, 768, generator=generator)
    as_device = {"dtype": torch.bfloat16 if device.type == "cuda" else torch.float32, "device": device}
    return (latent.to(**as_device), torch.tensor([0.5], **as_device), context.to(**as_device)), {
        "y": pooled.to(**as_device), "guidance": torch.tensor([3.5], **as_device), "transformer_options": {}}


def record_block_inputs(diffusion_model, args, kwargs):
    """Runs one forward; returns {block path: (args, kwargs)} as each block received them, and the output."""
    recorded, handles = {}, []
    for path, block in flux_blocks(diffusion_model):
        def record(module, block_args, block_kwargs, path=path):
            recorded[path] = cloned((block_args, block_kwargs))
        handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
    try:
        output = diffusion_model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return recorded, output


def layer_error_hooks(reference_block, fp8_blocks, errors):
    """Hooks on the bf16 block's linear layers that run the same input through the FP8 models' layers."""
    handles = []
    for name, layer in reference_block.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        fp8_layers = {variant: block.get_submodule(name) for variant, block in fp8_blocks.items()}

        def compare(module, inputs, output, name=name, fp8_layers=fp8_layers):
            # Core's fp8 layer clamps its input in place: each layer gets its own copy.
            errors[name] = {variant: relative_error(fp8_layer(inputs[0].clone()), output)
                            for variant, fp8_layer in fp8_layers.items()}
        handles.append(layer.register_forward_hook(compare))
    return handles


def block_output(block, block_args, block_kwargs):
    out = block(*cloned(block_args), **cloned(block_kwargs))
    return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out.flatten()


def compare_blocks(reference, fp8_models, recorded):
    """(per-layer rows, per-block rows): errors of each FP8 model against the bf16 one."""
    layer_rows, block_rows = [], []
    fp8_block_maps = {variant: dict(flux_blocks(model)) for variant, model in fp8_models.items()}
    for path, block in flux_blocks(reference):
        block_args, block_kwargs = recorded[path]
        fp8_blocks = {variant: blocks[path] for variant, blocks in fp8_block_maps.items()}
        layer_errors = {}
        handles = layer_error_hooks(block, fp8_blocks, layer_errors)
        try:
            expected = block_output(block, block_args, block_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        layer_rows += [{"layer": f"{path}.{name}", **errors} for name, errors in layer_errors.items()]
        block_rows.append({"block": path, **{variant: relative_error(block_output(fp8_block, block_args, block_kwargs), expected)
                                             for variant, fp8_block in fp8_blocks.items()}})
    return layer_rows, block_rows


def layer_kind(path):
    return re.sub(r"\.\d+\.", ".*.", path, count=1)


def summary_rows(rows, key, variants):
    """Per kind of layer (or block): median and max error of each variant, and the worst ratio."""
    kinds = {}
    for row in rows:
        kinds.setdefault(layer_kind(row[key]) if key == "layer" else row[key].split(".")[0], []).append(row)
    summary = []
    for kind, members in kinds.items():
        entry = {"kind": kind, "count": len(members)}
        for variant in variants:
            values = [member[variant] for member in members]
            entry[f"{variant}_median"] = statistics.median(values)
            entry[f"{variant}_max"] = max(values)
        entry["worst_ratio"] = max(member[variants[0]] / member[variants[1]] for member in members)
        summary.append(entry)
    return summary


def markdown(report):
    lines = [f"{report['device']}, torch {report['torch']}, {report['resolution']}, relative error vs bf16", "",
             "| layers | count | pack FP8 median | pack FP8 max | core fp8_fast median | core fp8_fast max | worst pack/core |",
             "|---|---|---|---|---|---|---|"]
    for entry in report["layer_summary"] + report["block_summary"]:
        lines.append(f"| {entry['kind']} | {entry['count']} | {entry['pack_fp8_median']:.4f} | {entry['pack_fp8_max']:.4f} | "
                     f"{entry['core_fp8fast_median']:.4f} | {entry['core_fp8fast_max']:.4f} | {entry['worst_ratio']:.3f} |")
    whole = report["whole_model"]
    lines += ["", f"Whole model, one forward: pack FP8 {whole['pack_fp8']:.4f}, core fp8_fast {whole['core_fp8fast']:.4f}."]
    return "\n".join(lines) + "\n"


def flux_dev_shaped(args, device):
    """(bf16, pack FP8, core fp8_fast) patchers of one random FLUX.1-dev-shaped model, and its inputs."""
    from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize

    config = flux_fixtures.flux_dev_width_unet_config(*((1, 1) if args.tiny else (19, 38)), context_in_dim=4096)
    state_dict = bench_flux.random_state_dict(config, device)
    # load_model takes the dict it is given (ComfyUI pops its tensors): each load gets its own.
    patchers = {
        "bf16": bench_flux.load_model(dict(state_dict), fp8=False),
        "pack_fp8": FP8DynamicQuantize.execute(bench_flux.load_model(dict(state_dict), fp8=False), "per-row",
                                               "").result[0],
        "core_fp8fast": bench_flux.load_model(dict(state_dict), fp8=True),
    }
    return patchers, model_inputs(args.resolution, device)


def trained_tiny_flux():
    """(bf16, pack FP8, core fp8_fast) patchers of the trained tiny FLUX, and inputs from its training domain."""
    from bench.fidelity import caches as fidelity

    fidelity.setup_comfyui()
    import comfy.ops
    from bench.fidelity import fp8 as fp8_fidelity
    from bench.fidelity import train_tiny_flux

    model = fidelity.load_shapes_model()
    patchers = {
        "bf16": fp8_fidelity.shapes_model_as(model, torch.bfloat16, None),
        "pack_fp8": fp8_fidelity.pack_fp8(fp8_fidelity.shapes_model_as(model, torch.bfloat16, None)),
        "core_fp8fast": fp8_fidelity.shapes_model_as(model, torch.float8_e4m3fn, torch.bfloat16, comfy.ops.fp8_ops),
    }
    [[context, extra]] = train_tiny_flux.comfy_conditioning(fidelity.spread_conditions(1)[0], model.world)
    size = model.world.latent_size
    noisy = torch.randn(1, model.world.channels, size, size, generator=torch.Generator().manual_seed(3))
    as_bf16 = {"dtype": torch.bfloat16}
    inputs = (noisy.to(**as_bf16), torch.tensor([0.5], **as_bf16), context.to(**as_bf16))
    return patchers, (inputs, {"y": extra["pooled_output"].to(**as_bf16), "guidance": torch.tensor([3.5], **as_bf16),
                               "transformer_options": {}})


@torch.no_grad()
def main():
    args = parse_args()
    if args.trained:
        patchers, (inputs, kwargs) = trained_tiny_flux()
        device = torch.device("cpu")
        description = "cpu (the pack's FP8 tensor-core math through torch._scaled_mm on the CPU), trained tiny FLUX"
    else:
        flux_fixtures.use_comfyui(args.comfyui)
        flux_fixtures.import_pack()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        patchers, (inputs, kwargs) = flux_dev_shaped(args, device)
        description = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    for patcher in patchers.values():
        patcher.patch_model(device_to=device)
    models = {name: patcher.model.diffusion_model for name, patcher in patchers.items()}
    reference = models.pop("bf16")

    from fluxaccel.kernels.fp8 import quantize as fp8

    emulate_tensor_cores = mock.patch.object(fp8, "fp8_matmul_supported", lambda device: True) if args.trained \
        else contextlib.nullcontext()
    with emulate_tensor_cores:
        recorded, expected = record_block_inputs(reference, inputs, kwargs)
        whole_model = {variant: relative_error(model(*inputs, **kwargs), expected) for variant, model in models.items()}
        layer_rows, block_rows = compare_blocks(reference, models, recorded)
    variants = list(models)
    report = {
        "device": description, "torch": torch.__version__,
        "resolution": "16x16 latent" if args.trained else f"{args.resolution}²",
        "whole_model": whole_model,
        "layer_summary": summary_rows(layer_rows, "layer", variants),
        "block_summary": summary_rows(block_rows, "block", variants),
        "layers": layer_rows, "blocks": block_rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    text = markdown(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
