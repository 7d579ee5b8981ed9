"""API-format text-to-image workflows on the generated test models (see flux_fixtures.py)."""
from flux_fixtures import TEST_CLIP_FILE, TEST_UNET_FILE, TEST_VAE_FILE


def text_to_image(model_nodes=(), width=128, height=128, steps=4, seed=0, cfg=1.0, prompt="a red circle",
                  negative="", output="latent", unet_name=TEST_UNET_FILE):
    """UNETLoader -> model_nodes (class_type, inputs) in order -> KSampler -> SaveLatent or VAEDecode+SaveImage.

    The test FLUX reads CLIP-L's text states, so CLIPLoader stands where FLUX.1-dev has DualCLIPLoader.
    """
    workflow = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEST_CLIP_FILE, "type": "stable_diffusion"}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": prompt}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": negative}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["positive", 0], "guidance": 3.5}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
    }
    model = ["unet", 0]
    for index, (class_type, inputs) in enumerate(model_nodes):
        node_id = f"accel{index}"
        workflow[node_id] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [node_id, 0]
    workflow["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["guided", 0], "negative": ["negative", 0], "latent_image": ["latent", 0],
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    if output == "latent":
        workflow["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "fluxaccel_test"}}
    else:
        workflow["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": TEST_VAE_FILE}}
        workflow["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
        workflow["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "fluxaccel_test"}}
    return workflow
