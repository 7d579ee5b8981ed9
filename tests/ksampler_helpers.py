"""Sampling through ComfyUI's own KSampler node on tiny FLUX models."""
import torch

import nodes
from cache_reports import parse_cache_report


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
    latent = {"samples": torch.zeros(batch_size, 16, size // 8, size // 8)}
    (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent)
    return out["samples"]


def cache_summaries(caplog):
    """(computed, total, reused) for every First Block Cache report logged so far."""
    return [report for record in caplog.records if (report := parse_cache_report(record.getMessage()))]


def relative_error(actual, expected):
    return ((actual - expected).abs().mean() / expected.abs().mean()).item()
