"""Sampling through ComfyUI's own KSampler node on tiny FLUX models."""
import torch

import comfy.ldm.modules.attention
import comfy.model_patcher
import comfy.sd
import nodes
from tests.support.cache_reports import parse_cache_report
from tests.support.flux_fixtures import tiny_flux_patcher
from fluxaccel.nodes.first_block_cache import ApplyBlockCache, ApplyFirstBlockCache


def conditioning(tokens=6, width=32, seed=0, guidance=3.5):
    """A CONDITIONING as CLIPTextEncode + FluxGuidance would give the tiny FLUX (context width 32)."""
    generator = torch.Generator().manual_seed(seed)
    cross_attn = torch.randn(1, tokens, width, generator=generator)
    pooled = torch.randn(1, width, generator=generator)
    return [[cross_attn, {"pooled_output": pooled, "guidance": guidance}]]


def ksample(model, positive=None, negative=None, seed=0, steps=6, cfg=1.0, size=32, batch_size=1,
            sampler_name="euler", scheduler="simple"):
    """Runs the real KSampler node; returns the latent samples."""
    positive = positive if positive is not None else conditioning(seed=1)
    negative = negative if negative is not None else conditioning(seed=2)
    latent_format = model.model.latent_format
    latent_size = size // latent_format.spacial_downscale_ratio
    latent = {"samples": torch.zeros(batch_size, latent_format.latent_channels, latent_size, latent_size)}
    (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent)
    return out["samples"]


def assert_replays_as_launched(launched, replaying, caplog, runs=2, **sampling):
    """Samples `launched` once, then `replaying` `runs` times with the same `sampling` arguments: each
    latent and cache report must equal the launched run's, bit for bit. Returns that cache report
    (computed, total, reused)."""
    expected = ksample(launched, **sampling)
    expected_steps = cache_summaries(caplog)[-1]
    for _ in range(runs):
        assert torch.equal(ksample(replaying, **sampling), expected)
        assert cache_summaries(caplog)[-1] == expected_steps
    return expected_steps


def cache_summaries(caplog):
    """(computed, total, reused) for every First Block Cache report logged so far."""
    return [report for record in caplog.records if (report := parse_cache_report(record.getMessage()))]


def relative_error(actual, expected):
    return ((actual - expected).abs().mean() / expected.abs().mean()).item()


def tiny_lora(model, rank=2, seed=5):
    """A LoRA in ComfyUI's generic key format for two of the tiny FLUX's layers."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"):
        weight = model.get_model_object(f"diffusion_model.{layer}").weight
        lora[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator)
        lora[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator)
    return lora


def with_lora(model, lora, strength):
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return patched


def with_cache(model, threshold, start_percent=0.0, end_percent=1.0, max_consecutive_hits=0):
    return ApplyFirstBlockCache.execute(model, threshold, start_percent, end_percent, max_consecutive_hits).result[0]


def with_block_cache(model, threshold, taylor_order=1, start_percent=0.0, end_percent=1.0, max_consecutive_hits=0,
                     probe_blocks=1, tail_blocks=0, every_n_steps=0, quality="threshold"):
    return ApplyBlockCache.execute(model, quality, threshold, taylor_order, start_percent, end_percent,
                                   max_consecutive_hits, probe_blocks, tail_blocks, every_n_steps).result[0]


def no_room_to_batch(monkeypatch):
    """As on a GPU short of memory: ComfyUI finds no room to batch conditionings and runs one model call for
    each. It asks the sampled ModelPatcher for free memory there; loading asks model_management, so the
    model still loads whole (a large memory_usage_factor made GPUs load it partially)."""
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda self, device: 0)


def pytorch_attention(attention_function, *args, **kwargs):
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


def gpu_like_flux(**config):
    """The tiny FLUX with ComfyUI's PyTorch SDPA attention, as ComfyUI picks on GPUs. On the CPU ComfyUI's
    default is its sub-quadratic attention, which asks psutil for free memory: a graph break in every block."""
    model = tiny_flux_patcher(**config)
    model.model_options["transformer_options"]["optimized_attention_override"] = pytorch_attention
    return model
