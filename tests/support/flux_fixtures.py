"""FLUX-architecture models built from ComfyUI's own classes, for tests and the demo.

Two kinds:
- `tiny_flux_patcher`: a few-thousand-parameter model of the FLUX family (FLUX.1, FLUX.2 or Chroma:
  `TINY_FAMILY`) built directly from ComfyUI's supported-model and model classes, wrapped in a real
  ModelPatcher.
- `write_test_model_files`: safetensors files that ComfyUI's own loaders detect (UNETLoader sees a
  FLUX with hidden 3072 and one double + one single block, in two files with different weights, and a
  FLUX.2 of hidden 256; CLIPLoader a CLIP-L; VAELoader the FLUX and FLUX.2 autoencoders;
  LoraLoaderModelOnly a LoRA for that FLUX), so end-to-end workflows run through the real loaders.
  The diffusion models take CLIP-L's 768-wide text states (ComfyUI reads `context_in_dim` from the
  weights): no T5-XXL or Mistral is needed.

Run as a script with the ComfyUI folder as argument to write the files (skips existing ones).
"""
import os
import sys

import torch

TEST_UNET_FILE = "fluxaccel-test-flux.safetensors"
TEST_CLIP_FILE = "fluxaccel-test-clip-l.safetensors"
TEST_VAE_FILE = "fluxaccel-test-ae.safetensors"
TEST_LORA_FILE = "fluxaccel-test-flux-lora.safetensors"
# The test FLUX's layout with weights of another seed: a second model, whose pictures differ from the
# first's (the soak test alternates the two).
TEST_UNET_OTHER_WEIGHTS_FILE = "fluxaccel-test-flux-other-weights.safetensors"

WEIGHT_STD = 0.02
# This checkout of the pack: tests/support/ lies two folders below it.
PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def use_comfyui(comfyui_dir):
    """Makes ComfyUI importable from this process, on the CPU where no GPU is present (as `--cpu`)."""
    comfyui_dir = os.path.abspath(comfyui_dir)
    if comfyui_dir not in sys.path:
        sys.path.insert(0, comfyui_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    # ComfyUI's nodes.py, imported now that it is first on the path: the pack's own `nodes/` package has its
    # name, and pytest may later put the repository's root ahead of ComfyUI (it does where the checkout's
    # folder name is no Python identifier, e.g. comfyui-fluxaccel: it imports the root __init__.py from there).
    import nodes  # noqa: F401


def import_pack(pack_dir=PACK_DIR, name="fluxaccel"):
    """Imports this checkout of the pack as package `name` (ComfyUI imports it by its folder name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"),
                                                  submodule_search_locations=[pack_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_flux_unet_config(hidden_size=64, depth=2, depth_single_blocks=3, context_in_dim=32, vec_in_dim=32,
                          guidance_embed=True):
    """unet_config of a small FLUX (head dim 16, four heads at hidden 64)."""
    head_dim = 16
    return {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": vec_in_dim,
        "context_in_dim": context_in_dim,
        "hidden_size": hidden_size,
        "mlp_ratio": 4.0,
        "num_heads": hidden_size // head_dim,
        "depth": depth,
        "depth_single_blocks": depth_single_blocks,
        "axes_dim": [4, 6, 6],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": guidance_embed,
        "txt_ids_dims": [],
    }


def flux2_unet_config(hidden_size, depth, depth_single_blocks, context_in_dim, guidance_embed=True):
    """The unet_config ComfyUI's detection (comfy/model_detection.py) gives a FLUX.2 state dict of these
    sizes: global modulation, SwiGLU MLPs, no biases, four RoPE axes of 32 (heads of 128), patch size 1 on
    128 latent channels. FLUX.2 dev embeds guidance; klein, distilled, has no guidance embedder."""
    return {
        "image_model": "flux2",
        "in_channels": 128,
        "out_channels": 128,
        "vec_in_dim": None,
        "context_in_dim": context_in_dim,
        "hidden_size": hidden_size,
        "mlp_ratio": 3.0,
        "num_heads": hidden_size // 128,
        "depth": depth,
        "depth_single_blocks": depth_single_blocks,
        "axes_dim": [32, 32, 32, 32],
        "theta": 2000,
        "patch_size": 1,
        "qkv_bias": False,
        "guidance_embed": guidance_embed,
        "txt_ids_dims": [3],
        "global_modulation": True,
        "mlp_silu_act": True,
        "ops_bias": False,
        "default_ref_method": "index",
        "ref_index_scale": 10.0,
    }


def tiny_flux2_unet_config(hidden_size=64, depth=2, depth_single_blocks=3, context_in_dim=32, guidance_embed=True):
    """unet_config of a small FLUX.2: FLUX.2's own with heads of 16 (four RoPE axes of 4), four at hidden 64."""
    config = flux2_unet_config(hidden_size, depth, depth_single_blocks, context_in_dim, guidance_embed)
    config.update(axes_dim=[4, 4, 4, 4], num_heads=hidden_size // 16)
    return config


def tiny_chroma_unet_config(hidden_size=64, depth=2, depth_single_blocks=3, context_in_dim=32):
    """unet_config of a small Chroma: the small FLUX.1's blocks, no pooled vector or guidance embedder, its
    modulations from the distilled guidance layer (input width 64, fixed by the model's code: 16 timestep +
    16 guidance + 32 index features; patched latent channels in and out, 16 x 2 x 2)."""
    config = tiny_flux_unet_config(hidden_size, depth, depth_single_blocks, context_in_dim, vec_in_dim=None)
    del config["guidance_embed"]
    config.update(image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=hidden_size, hidden_dim=32,
                  n_layers=2)
    return config


# The tiny models of ComfyUI's FLUX family: (unet_config builder, ComfyUI's supported-model class name).
# FLUX.1 Kontext is the FLUX.1 model given reference latents in its conditioning.
TINY_FAMILY = {
    "flux1": (tiny_flux_unet_config, "Flux"),
    "flux2": (tiny_flux2_unet_config, "Flux2"),
    "chroma": (tiny_chroma_unet_config, "Chroma"),
}


def randomize_(module, seed, weight_std=WEIGHT_STD):
    """Fills every weight deterministically: small normal matrices, zero biases, unit norm scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.ndim >= 2:
                values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * weight_std
            elif name.endswith("bias"):
                values = torch.zeros(tensor.shape)
            else:
                values = torch.ones(tensor.shape)
            tensor.copy_(values.to(tensor.dtype))
    return module


def flux_dev_width_unet_config(depth, depth_single_blocks, context_in_dim):
    """FLUX.1-dev's widths (hidden 3072, 24 heads of 128, its RoPE axes) with the given depth and text width."""
    config = tiny_flux_unet_config(hidden_size=3072, depth=depth, depth_single_blocks=depth_single_blocks,
                                   context_in_dim=context_in_dim, vec_in_dim=768)
    config.update(axes_dim=[16, 56, 56], num_heads=24)
    return config


def tiny_flux_patcher(seed=0, dtype=torch.float32, family="flux1", weight_std=WEIGHT_STD, **config):
    """A real ComfyUI ModelPatcher around a tiny model of the FLUX family (TINY_FAMILY's keys) with
    deterministic random weights (larger `weight_std`: attention that singles out tokens more)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    make_unet_config, supported_model = TINY_FAMILY[family]
    unet_config = make_unet_config(**config)
    model_config = getattr(comfy.supported_models, supported_model)(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    randomize_(model.diffusion_model, seed, weight_std)
    model.diffusion_model.to(dtype)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def detectable_flux(device=None):
    """The smallest FLUX that UNETLoader detects as FLUX: hidden 3072, one double, one single block."""
    import comfy.ldm.flux.model
    import comfy.ops

    config = flux_dev_width_unet_config(depth=1, depth_single_blocks=1, context_in_dim=768)
    return comfy.ldm.flux.model.Flux(**config, dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init)


def detectable_flux_state_dict(seed=0):
    return randomize_(detectable_flux(), seed).state_dict()


def detectable_flux_lora_state_dict(seed=3, rank=4):
    """A LoRA (ComfyUI's generic key format) for the attention and MLP input layers of the test FLUX."""
    # Only the shapes are needed: the meta device allocates nothing.
    shapes = {name: tensor.shape for name, tensor in detectable_flux(device="meta").state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"):
        out_features, in_features = shapes[f"{layer}.weight"]
        lora[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * WEIGHT_STD
        lora[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * WEIGHT_STD
    return {name: tensor.to(torch.bfloat16) for name, tensor in lora.items()}


def clip_l_state_dict(seed=1):
    """A CLIP-L text encoder with random weights, in the layout CLIPLoader detects."""
    import json

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    config_path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")
    with open(config_path) as f:
        config = json.load(f)
    model = comfy.clip_model.CLIPTextModel(config, torch.float16, "cpu", comfy.ops.disable_weight_init)
    return randomize_(model, seed).state_dict()


def flux_vae_state_dict(seed=2):
    """The FLUX autoencoder (16 latent channels) with random weights."""
    import comfy.ldm.models.autoencoder

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    model = comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return {k: v.to(torch.float16) for k, v in randomize_(model, seed).state_dict().items()}


def write_test_model_files(comfyui_dir):
    """Writes the loader-detectable test models into the host's model folders (once)."""
    import safetensors.torch

    targets = [
        ("diffusion_models", TEST_UNET_FILE, detectable_flux_state_dict),
        ("diffusion_models", TEST_UNET_OTHER_WEIGHTS_FILE, lambda: detectable_flux_state_dict(seed=6)),
        ("text_encoders", TEST_CLIP_FILE, clip_l_state_dict),
        ("vae", TEST_VAE_FILE, flux_vae_state_dict),
        ("loras", TEST_LORA_FILE, detectable_flux_lora_state_dict),
        ("diffusion_models", TEST_FLUX2_UNET_FILE, detectable_flux2_state_dict),
        ("vae", TEST_FLUX2_VAE_FILE, flux2_vae_state_dict),
    ]
    for folder, filename, make_state_dict in targets:
        path = os.path.join(comfyui_dir, "models", folder, filename)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state_dict = {k: v.contiguous() for k, v in make_state_dict().items()}
        safetensors.torch.save_file(state_dict, path + ".partial")
        os.replace(path + ".partial", path)
        print(f"[setup] wrote test model {path}")


# A FLUX.2 that UNETLoader detects as FLUX.2 (comfy.supported_models.Flux2), and a FLUX.2 autoencoder
# (128 latent channels) that VAELoader detects; the FLUX.2 takes CLIP-L's text states like the test FLUX.
TEST_FLUX2_UNET_FILE = "fluxaccel-test-flux2.safetensors"
TEST_FLUX2_VAE_FILE = "fluxaccel-test-flux2-ae.safetensors"


def detectable_flux2(device=None):
    """The smallest FLUX.2 that UNETLoader detects: ComfyUI's detection fixes FLUX.2's RoPE axes (head
    dim 128) and reads the width from the weights, so hidden 256 (two heads), one double, one single block."""
    import comfy.ldm.flux.model
    import comfy.ops

    config = flux2_unet_config(hidden_size=256, depth=1, depth_single_blocks=1, context_in_dim=768)
    return comfy.ldm.flux.model.Flux(**config, dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init)


def detectable_flux2_state_dict(seed=4):
    return randomize_(detectable_flux2(), seed).state_dict()


def flux2_vae_state_dict(seed=5):
    """The FLUX.2 autoencoder with random weights: 32 channels, packed 2x2 into 128 by its batch norm
    (ComfyUI detects FLUX.2's by that norm's running statistics, next to quant convolutions)."""
    import comfy.ldm.models.autoencoder

    ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                "batch_norm_latent": True}
    model = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=32)
    return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in randomize_(model, seed).state_dict().items()}


if __name__ == "__main__":
    use_comfyui(sys.argv[1])
    write_test_model_files(os.path.abspath(sys.argv[1]))
