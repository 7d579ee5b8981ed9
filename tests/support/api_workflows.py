"""API-format workflows: text-to-image on the generated test models (see tests/support/flux_fixtures.py), and the
shipped workflows (FLUX.1-dev, FLUX.1 Kontext dev, FLUX.2 dev) turned into ones the test host can run."""
import copy

from tests.support.flux_fixtures import (TEST_CLIP_FILE, TEST_FLUX2_UNET_FILE, TEST_FLUX2_VAE_FILE, TEST_LORA_FILE,
                                          TEST_UNET_FILE, TEST_VAE_FILE)

# The model files the workflows name, per loader input, with their model folder.
MODEL_FILE_INPUTS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
}
# What the test host has in those folders (tests/support/flux_fixtures.py): enough for the editor's checks.
TEST_MODEL_FILES = {"diffusion_models": TEST_UNET_FILE, "text_encoders": TEST_CLIP_FILE, "vae": TEST_VAE_FILE,
                    "loras": TEST_LORA_FILE}
# FLUX.2's diffusion model and autoencoder (files named flux2*) have their own test files: FLUX.2's latent
# has 128 channels. Its text encoder (Mistral) stands as CLIP-L, like T5-XXL for FLUX.1.
FLUX2_FILE_PREFIX = "flux2"
TEST_FLUX2_MODEL_FILES = {"diffusion_models": TEST_FLUX2_UNET_FILE, "vae": TEST_FLUX2_VAE_FILE}


def stand_in_file(folder, name):
    """The test host's file standing for the workflow's model file `name` in `folder`."""
    if name.startswith(FLUX2_FILE_PREFIX) and folder in TEST_FLUX2_MODEL_FILES:
        return TEST_FLUX2_MODEL_FILES[folder]
    return TEST_MODEL_FILES[folder]


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


def api_with_test_models(api_workflow):
    """The API workflow naming the test host's model files instead of the real models'."""
    workflow = copy.deepcopy(api_workflow)
    for node in workflow.values():
        for name, value in node["inputs"].items():
            if (folder := MODEL_FILE_INPUTS.get((node["class_type"], name))) is not None:
                node["inputs"][name] = stand_in_file(folder, value)
    return workflow


def model_files_named(api_workflows):
    """{model folder: file names} that the workflows load."""
    files = {}
    for workflow in api_workflows:
        for node in workflow.values():
            for name, value in node["inputs"].items():
                if (folder := MODEL_FILE_INPUTS.get((node["class_type"], name))) is not None:
                    files.setdefault(folder, set()).add(value)
    return files


def runnable_on_test_host(api_workflow, size=128, steps=3):
    """A shipped workflow as the CPU test host can run it: the test model files; the test CLIP-L loaded
    as CLIP-L where FLUX.1 has DualCLIPLoader (T5-XXL) and FLUX.2 its Mistral text encoder (neither's
    weights are available offline; the test models read CLIP-L's text states); a small image (Kontext's
    input image scaled to it instead of to Kontext's preferred 1-megapixel sizes) and few steps.
    Everything else is unchanged."""
    workflow = api_with_test_models(api_workflow)
    for node in workflow.values():
        if node["class_type"] in ("DualCLIPLoader", "CLIPLoader"):
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": TEST_CLIP_FILE, "type": "stable_diffusion"}
        elif node["class_type"] in ("EmptySD3LatentImage", "EmptyFlux2LatentImage"):
            node["inputs"].update(width=size, height=size)
        elif node["class_type"] == "FluxKontextImageScale":
            node["class_type"] = "ImageScale"
            node["inputs"].update(upscale_method="bilinear", width=size, height=size, crop="center")
        elif node["class_type"] == "Flux2Scheduler":
            node["inputs"].update(steps=steps, width=size, height=size)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return workflow
