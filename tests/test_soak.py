"""Back-to-back prompts through the real server with every node in use: nothing grows, nothing goes stale.

CPU variant (scaled down): two models, two LoRA strengths, two First Block Cache thresholds and two
resolutions, each combination run twice, 16 prompts in all. The second round must reproduce the
first round's latents exactly, and use no more memory, threads or processes than the first left.
"""
import os

import psutil
import pytest
import safetensors.torch
import torch

from api_workflows import text_to_image
from conftest import COMFYUI_DIR
from flux_fixtures import TEST_LORA_FILE, TEST_UNET_FILE, TEST_UNET_SECOND_NAME

pytestmark = pytest.mark.server

ROUNDS = 2
# Allocator and page-cache noise of a CPU server that holds two 1 GB models.
RSS_GROWTH_BOUND_MB = 256


def soak_workflow(index):
    model = (TEST_UNET_FILE, TEST_UNET_SECOND_NAME)[index % 2]
    strength, size = ((0.5, 128), (1.0, 160))[(index // 2) % 2]
    threshold = (0.3, 0.6)[(index // 4) % 2]
    nodes = [
        ("LoraLoaderModelOnly", {"lora_name": TEST_LORA_FILE, "strength_model": strength}),
        ("FluxAccelFP8DynamicQuantize", {"activation_scaling": "per-row", "exclude": ""}),
        ("FluxAccelCompile", {"mode": "default", "dynamic_shapes": "automatic"}),
        ("FluxAccelAttention", {"backend": "auto"}),
        ("FluxAccelFirstBlockCache", {"residual_diff_threshold": threshold, "start_percent": 0.0, "end_percent": 1.0,
                                      "max_consecutive_hits": 0}),
    ]
    return text_to_image(nodes, width=size, height=size, steps=4, seed=index % 8, unet_name=model)


def saved_latent(entry):
    [latent] = entry["outputs"]["save"]["latents"]
    path = os.path.join(COMFYUI_DIR, "output", latent["subfolder"], latent["filename"])
    return safetensors.torch.load_file(path)["latent_tensor"]


def server_footprint(server):
    process = psutil.Process(server.process.pid)
    return {"rss_mb": process.memory_info().rss / 2**20, "threads": process.num_threads(),
            "children": len(process.children(recursive=True))}


def test_sixteen_prompts_reproduce_and_leak_nothing(comfy_server):
    combinations = 8
    latents, footprints = [], []
    for soak_round in range(ROUNDS):
        for index in range(combinations):
            latents.append(saved_latent(comfy_server.run(soak_workflow(index))))
        footprints.append(server_footprint(comfy_server))
    first, last = footprints[0], footprints[-1]
    for index in range(combinations):
        assert torch.equal(latents[combinations + index], latents[index]), f"combination {index} changed"
    assert len({latent.shape for latent in latents}) == 2 and not torch.equal(latents[0], latents[2])
    assert last["rss_mb"] - first["rss_mb"] < RSS_GROWTH_BOUND_MB, footprints
    assert last["threads"] <= first["threads"] and last["children"] <= first["children"], footprints
