"""FLUX-architecture models built from ComfyUI's own classes, for tests and the demo.

Two kinds:
- `tiny_flux_patcher`: a few-thousand-parameter FLUX built directly from
  `comfy.supported_models.Flux` + `comfy.model_base.Flux`, wrapped in a real ModelPatcher.
- `write_test_model_files`: safetensors files that ComfyUI's own loaders detect (UNETLoader sees a
  FLUX with hidden 3072 and one double + one single block; CLIPLoader a CLIP-L; VAELoader the
  FLUX autoencoder; LoraLoaderModelOnly a LoRA for that FLUX), so end-to-end workflows run through
  the real loaders. The FLUX takes CLIP-L's 768-wide text states (ComfyUI reads `context_in_dim`
  from the weights): no T5-XXL is needed.

Run as a script with the ComfyUI folder as argument to write the files (skips existing ones).
"""
import os
import sys

import torch

TEST_UNET_FILE = "fluxaccel-test-flux.safetensors"
TEST_CLIP_FILE = "fluxaccel-test-clip-l.safetensors"
TEST_VAE_FILE = "fluxaccel-test-ae.safetensors"
TEST_LORA_FILE = "fluxaccel-test-flux-lora.safetensors"
# The test FLUX under a second name: ComfyUI loads it as a second model (the soak test alternates).
TEST_UNET_SECOND_NAME = "fluxaccel-test-flux-second.safetensors"

WEIGHT_STD = 0.02


def use_comfyui(comfyui_dir):
    """Makes ComfyUI importable from this process, on the CPU where no GPU is present (as `--cpu`)."""
    comfyui_dir = os.path.abspath(comfyui_dir)
    if comfyui_dir not in sys.path:
        sys.path.insert(0, comfyui_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def import_pack(pack_dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name="fluxaccel"):
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


def randomize_(module, seed):
    """Fills every weight deterministically: small normal matrices, zero biases, unit norm scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.ndim >= 2:
                values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * WEIGHT_STD
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


def tiny_flux_patcher(seed=0, dtype=torch.float32, **config):
    """A real ComfyUI ModelPatcher around a tiny FLUX with deterministic random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = tiny_flux_unet_config(**config)
    model_config = comfy.supported_models.Flux(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    randomize_(model.diffusion_model, seed)
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
        ("text_encoders", TEST_CLIP_FILE, clip_l_state_dict),
        ("vae", TEST_VAE_FILE, flux_vae_state_dict),
        ("loras", TEST_LORA_FILE, detectable_flux_lora_state_dict),
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
    second = os.path.join(comfyui_dir, "models", "diffusion_models", TEST_UNET_SECOND_NAME)
    if not os.path.lexists(second):
        os.symlink(TEST_UNET_FILE, second)


if __name__ == "__main__":
    use_comfyui(sys.argv[1])
    write_test_model_files(os.path.abspath(sys.argv[1]))
