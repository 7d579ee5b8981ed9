"""Demo: Apply First Block Cache at its default threshold on a trained FLUX, through ComfyUI's KSampler node.

The model is tests/assets/tiny_flux_shapes.safetensors (bench/fidelity/train_tiny_flux.py): a small FLUX of
ComfyUI's own classes, trained to draw the shape, colour and position its prompt asks for, in a real
ModelPatcher, sampled in this process by ComfyUI's KSampler node (the route bench/fidelity/caches.py
measures; ComfyUI's UNETLoader cannot load it: its detection fixes FLUX's heads at 128 wide, this
model's are 16, and its prompts come from its own word table, not a text encoder). A random-weight
FLUX would show little: its first block's residual moves so much between steps that the default
threshold reuses none of them.

For each prompt: the steps the cache reused (the pack's own report line), the time of the run without
and with the node (the fastest of RUNS: other work on the machine only ever adds time), and the PSNR
of the cached latent against the uncached one (peak = the uncached latent's range, as docs/FIDELITY.md
measures; no VAE is involved).

Run by `bash scripts/setup_host.sh`; on its own:
    COMFYUI_DIR=.host/ComfyUI .host/venv/bin/python -m bench.demo      (from the repository root)
"""
import logging
import os
import time

from bench.fidelity import caches as fidelity
from bench.fidelity.train_tiny_flux import Condition
from tests.support.cache_reports import CacheReportRecorder

PROMPTS = (Condition("circle", "red", "left"), Condition("square", "blue", "center"),
           Condition("bar", "yellow", "right"))
SEED = 0
RUNS = 5


def timed_sample(patcher, condition, world):
    """(the latent, seconds, the pack's report lines) of one KSampler run."""
    with CacheReportRecorder() as recorder:
        started = time.perf_counter()
        latent = fidelity.ksample(patcher, condition, SEED, world)
        seconds = time.perf_counter() - started
    return latent, seconds, recorder.report_lines


def compare(uncached, cached, condition, world):
    """(uncached latent, cached latent, fastest seconds of each, the cached run's report lines). The runs
    alternate, so that load from other processes on the machine falls on both alike."""
    uncached_seconds, cached_seconds = [], []
    for _ in range(RUNS):
        reference, seconds, _ = timed_sample(uncached, condition, world)
        uncached_seconds.append(seconds)
        latent, seconds, report_lines = timed_sample(cached, condition, world)
        cached_seconds.append(seconds)
    return reference, latent, min(uncached_seconds), min(cached_seconds), report_lines


def default_threshold():
    from fluxaccel.nodes.first_block_cache import ApplyFirstBlockCache

    return next(i.default for i in ApplyFirstBlockCache.define_schema().inputs if i.id == "residual_diff_threshold")


def main():
    fidelity.setup_comfyui(os.environ["COMFYUI_DIR"])
    import comfy.utils
    import comfyui_version

    comfy.utils.PROGRESS_BAR_ENABLED = False
    # ComfyUI's log would repeat each report line that the demo prints beside its run.
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    model = fidelity.load_shapes_model()
    default = fidelity.CacheSetting(threshold=default_threshold())
    cached = default.applied_to(model.patcher)
    print(f"[demo] {model.describe()}")
    print(f"[demo] ComfyUI {comfyui_version.__version__}'s KSampler node, Euler, {fidelity.STEPS} steps, seed {SEED}, "
          f"on {fidelity.device_description()}; Apply First Block Cache at its default threshold {default.threshold}")
    fidelity.ksample(model.patcher, PROMPTS[0], SEED, model.world, steps=2)  # first call's one-off costs
    for condition in PROMPTS:
        reference, latent, uncached_s, cached_s, report_lines = compare(model.patcher, cached, condition, model.world)
        print(f"[demo] \"{condition.prompt()}\": without the node {uncached_s:.2f} s, with it {cached_s:.2f} s "
              f"({uncached_s / cached_s:.2f}x); cached latent {fidelity.psnr(latent, reference):.1f} dB PSNR "
              f"from the uncached one")
        for line in report_lines:
            print(f"[demo]   the pack reports: {line}")


if __name__ == "__main__":
    main()
