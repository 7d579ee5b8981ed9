"""Back-to-back prompts through the real server with every node in use: nothing grows, nothing goes stale.

Two models (two files of the test FLUX with different weights), two LoRA strengths, two First Block
Cache thresholds and two resolutions: 8 combinations, each run once per round, in one process and
again with Context Parallel last (two ranks: its worker gets each model, LoRA strength and setting in
turn). Later rounds must reproduce
the reference round's latents exactly, and use no more memory (processes, and on a GPU the memory
torch holds there), threads or processes than the first left. The reference is the first round on
the CPU, where a fresh server's first prompt and a later one agree bit for bit. On a GPU it is the
second round: until both sizes have been seen, prompts run the fixed-shape graphs compiled first,
later ones the size-generic graphs, whose kernels sum in another order; First Block Cache's
threshold can turn those last-bit differences into another skip decision (seen on an H200: plain,
LoRA, FP8 and LoRA + FP8 chains reproduce their first prompt exactly, FP8 + Compile FLUX does not).
CI runs 2 rounds on the CPU (16 prompts each way); on a GPU machine,
`COMFYUI_DIR=... FLUXACCEL_SOAK_ROUNDS=7 python3 -m pytest tests/test_soak.py` runs 56.
"""
import os

import psutil
import pytest
import safetensors.torch
import torch

from tests.support.api_workflows import text_to_image
from conftest import COMFYUI_DIR
from tests.support.flux_fixtures import TEST_LORA_FILE, TEST_UNET_FILE, TEST_UNET_OTHER_WEIGHTS_FILE
from test_server import CONTEXT_PARALLEL_NODE

pytestmark = pytest.mark.server

ROUNDS = int(os.environ.get("FLUXACCEL_SOAK_ROUNDS", "3" if torch.cuda.is_available() else "2"))
COMBINATIONS = 8
# Allocator and page-cache noise of a server that holds two 1 GB models.
RSS_GROWTH_BOUND_MB = 256
# What torch may hold on the GPU after the last round beyond what it held after the first: one
# activation-sized block of allocator slack, far below a model (1 GB) or a leaked compiled graph's pool.
GPU_MEMORY_GROWTH_BOUND_MB = 256


def soak_workflow(index, context_parallel=False):
    model = (TEST_UNET_FILE, TEST_UNET_OTHER_WEIGHTS_FILE)[index % 2]
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
    if context_parallel:
        nodes.append(CONTEXT_PARALLEL_NODE)
    # Prompts 2k and 2k + 1 differ in the model alone.
    return text_to_image(nodes, width=size, height=size, steps=4, seed=index // 2, unet_name=model)


def saved_latent(entry):
    [latent] = entry["outputs"]["save"]["latents"]
    path = os.path.join(COMFYUI_DIR, "output", latent["subfolder"], latent["filename"])
    return safetensors.torch.load_file(path)["latent_tensor"]


def server_footprint(server):
    """The server's and its child processes' (Context Parallel's workers among them) memory and threads."""
    process = psutil.Process(server.process.pid)
    children = process.children(recursive=True)
    [device] = server.get("/system_stats")["devices"]
    return {"rss_mb": sum(p.memory_info().rss for p in [process, *children]) / 2**20,
            "threads": sum(p.num_threads() for p in [process, *children]), "children": len(children),
            "torch_device_memory_mb": device["torch_vram_total"] / 2**20 if device["type"] == "cuda" else 0.0}


@pytest.mark.parametrize("context_parallel", [
    pytest.param(False, id="one-process"),
    pytest.param(True, id="context-parallel", marks=pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="Context Parallel needs two GPUs here")),
])
def test_back_to_back_prompts_reproduce_and_leak_nothing(comfy_server, context_parallel):
    latents, footprints = [], []
    for soak_round in range(ROUNDS):
        for index in range(COMBINATIONS):
            latents.append(saved_latent(comfy_server.run(soak_workflow(index, context_parallel))))
        footprints.append(server_footprint(comfy_server))
    print("per-round footprints:", footprints)
    first, last = footprints[0], footprints[-1]
    reference = COMBINATIONS if torch.cuda.is_available() else 0
    for index in range(reference + COMBINATIONS, len(latents)):
        assert torch.equal(latents[index], latents[reference + index % COMBINATIONS]), f"prompt {index} changed"
    assert len({latent.shape for latent in latents}) == 2 and not torch.equal(latents[0], latents[2])
    assert not torch.equal(latents[0], latents[1]), "the two models' files drew the same picture"
    assert last["rss_mb"] - first["rss_mb"] < RSS_GROWTH_BOUND_MB, footprints
    assert last["torch_device_memory_mb"] - first["torch_device_memory_mb"] < GPU_MEMORY_GROWTH_BOUND_MB, footprints
    assert last["threads"] <= first["threads"] and last["children"] <= first["children"], footprints
