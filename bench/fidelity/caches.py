"""How far First Block Cache and Block Cache move FLUX's images from the uncached ones, on a trained FLUX.

Library and CLI. The model is tests/assets/tiny_flux_shapes.safetensors (bench/fidelity/train_tiny_flux.py):
a small FLUX of ComfyUI's own classes, trained to draw the shape, colour and position its prompt
asks for. Every image comes from ComfyUI's real KSampler node on a real ModelPatcher, with and
without the pack's cache nodes (Apply First Block Cache; Apply Block Cache with its Taylor orders,
probe and tail blocks and fixed schedules); the share of skipped steps is read from the node's own
log report ("computed C/N steps, reused R/N").

Metrics compare a cached latent with the uncached latent of the same prompt and seed, in the
latent space KSampler returns (16 channels; no VAE is involved):
- PSNR, with the peak taken as the dynamic range (max - min) of the uncached reference;
- SSIM, Gaussian window (7 px, sigma 1.5, sized for 16x16 latents), per channel, then averaged;
- no LPIPS: no usable offline LPIPS package is available here, and its weights would have to be
  downloaded.

    python -m bench.fidelity.caches                # prints the curve and the Block Cache table
    python -m bench.fidelity.caches --write-docs   # and writes docs/FIDELITY.md and its raw JSON in docs/results
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from bench.fidelity import train_tiny_flux
from bench.fidelity.train_tiny_flux import ALL_CONDITIONS, COLOURS, POSITIONS, SHAPES, Condition, ShapesWorld
from tests.support import flux_fixtures
from tests.support.cache_reports import CacheReportRecorder
from tests.support.flux_fixtures import PACK_DIR

DEFAULT_WEIGHTS = os.path.join(PACK_DIR, "tests", "assets", "tiny_flux_shapes.safetensors")
DOCS_PATH = os.path.join(PACK_DIR, "docs", "FIDELITY.md")
RESULTS_DIR = os.path.join(PACK_DIR, "docs", "results")
DEFAULT_THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.2, 0.25, 0.3)
# Block Cache's table: thresholds x Taylor orders x (probe, tail) layouts, and fixed schedules.
BLOCK_CACHE_THRESHOLDS = (0.08, 0.12, 0.16, 0.2, 0.22, 0.24, 0.28)
TAYLOR_ORDERS = (0, 1, 2)
BLOCK_CACHE_LAYOUTS = ((1, 0), (2, 0), (1, 1), (2, 1))
FIXED_SCHEDULES = (2, 3)
# A Block Cache setting must beat First Block Cache's default by one of these on the table's cases:
# as many more steps skipped at its PSNR, or as many dB closer at its share of skipped steps.
BAR_SKIP_RATIO = 1.3
BAR_PSNR_GAIN_DB = 6.0
# Block Cache's quality targets are calibrated on this image (neither its prompt nor its seed is among
# the table's cases), then measured on the table's cases.
CALIBRATION_CONDITION_INDEX, CALIBRATION_SEED = 11, 20
# Orders whose PSNR differs by less than this count as a tie: the lower order extrapolates less far
# from measured residuals, the safer choice on models less smooth than this one.
ORDER_TIE_DB = 1.0
DEFAULT_SEEDS = (0, 1)
DEFAULT_CONDITION_COUNT = 6
STEPS = 28

# What a good default must reach (averaged over the measured prompts and seeds).
MIN_SKIPPED_FRACTION = 0.35
MIN_MEAN_PSNR_DB = 30.0
# The thresholds used with FLUX.1-dev in practice; preferred when several qualify.
FLUX_DEV_PRACTICE = (0.08, 0.12)

SSIM_WINDOW = 7
SSIM_SIGMA = 1.5


def setup_comfyui(comfyui_dir=train_tiny_flux.DEFAULT_COMFYUI_DIR, pack_dir=PACK_DIR):
    """Makes ComfyUI and the pack (as `fluxaccel`; this checkout unless told) importable."""
    flux_fixtures.use_comfyui(comfyui_dir)
    if "fluxaccel" not in sys.modules:
        flux_fixtures.import_pack(os.path.abspath(pack_dir))


# ---------------------------------------------------------------------------------------------
# Metrics

def psnr(result, reference):
    """PSNR in dB of `result` against `reference`, as the pack's calibration measures it (peak = the
    reference's dynamic range, max - min; identical tensors give inf)."""
    from fluxaccel.kernels.residual_cache import latent_psnr

    return latent_psnr(result, reference)


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    coordinates = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-coordinates ** 2 / (2 * sigma ** 2))
    profile /= profile.sum()
    return profile[:, None] * profile[None, :]


def ssim(result, reference, window_size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """Mean SSIM over channels of (C, H, W) or (B, C, H, W) tensors (Wang et al. 2004).

    Local statistics under a Gaussian window, each channel on its own ("valid" positions only);
    the stabilising constants use the reference's dynamic range as L, as psnr does.
    """
    result, reference = result.double(), reference.double()
    if result.ndim == 3:
        result, reference = result[None], reference[None]
    channels = result.shape[1]
    window = gaussian_window(window_size, sigma).expand(channels, 1, window_size, window_size)

    def local_mean(x):
        return torch.nn.functional.conv2d(x, window, groups=channels)

    dynamic_range = (reference.max() - reference.min()).item()
    c1, c2 = (0.01 * dynamic_range) ** 2, (0.03 * dynamic_range) ** 2
    mu_x, mu_y = local_mean(result), local_mean(reference)
    var_x = local_mean(result * result) - mu_x ** 2
    var_y = local_mean(reference * reference) - mu_y ** 2
    covariance = local_mean(result * reference) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


# ---------------------------------------------------------------------------------------------
# The trained model, through ComfyUI's own loader classes and sampler node

@dataclasses.dataclass
class ShapesModel:
    patcher: object  # comfy.model_patcher.ModelPatcher
    world: ShapesWorld
    metadata: dict
    path: str

    def describe(self) -> str:
        config = json.loads(self.metadata["unet_config"])
        training = json.loads(self.metadata["training"])
        final_loss = json.loads(self.metadata["loss_log"])[-1][1]
        return (f"FLUX (comfy.model_base.Flux), hidden {config['hidden_size']}, {config['num_heads']} heads of "
                f"{sum(config['axes_dim'])}, {config['depth']} double + {config['depth_single_blocks']} single blocks, "
                f"context/pooled width {config['context_in_dim']}/{config['vec_in_dim']}, "
                f"{int(self.metadata['parameters']):,} parameters; trained {training['steps']} steps of batch "
                f"{training['batch_size']} in {self.metadata['training_seconds']} s "
                f"({self.metadata['threads']} CPU threads, final flow-matching loss {final_loss}); "
                f"{self.world.latent_size}x{self.world.latent_size} latents "
                f"({(self.world.latent_size // 2) ** 2} image tokens)")


def load_shapes_model(path=DEFAULT_WEIGHTS) -> ShapesModel:
    """The trained FLUX in a real ModelPatcher, in fp32, on ComfyUI's torch device."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import safetensors

    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        state_dict = {name: f.get_tensor(name).float() for name in f.keys()}
    model_config = comfy.supported_models.Flux(json.loads(metadata["unet_config"]))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(state_dict, strict=True)
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    return ShapesModel(patcher, ShapesWorld.from_json(metadata["world"]), metadata, path)


def ksample(patcher, condition: Condition, seed, world: ShapesWorld, steps=STEPS):
    """One image through ComfyUI's KSampler node: Euler, "simple" schedule, cfg 1 with FLUX guidance 3.5."""
    import nodes

    positive = train_tiny_flux.comfy_conditioning(condition, world)
    negative = positive  # cfg 1.0: ComfyUI never evaluates the negative
    latent = {"samples": torch.zeros(1, world.channels, world.latent_size, world.latent_size)}
    (out,) = nodes.KSampler().sample(patcher, seed, steps, 1.0, "euler", "simple", positive, negative, latent)
    return out["samples"][0]


@dataclasses.dataclass(frozen=True)
class CacheSetting:
    """One configuration of the pack's cache nodes: Apply First Block Cache at a threshold (block_cache
    false), or Apply Block Cache; inputs not named here keep the node's defaults."""
    threshold: float
    block_cache: bool = False
    taylor_order: int = 0
    probe_blocks: int = 1
    tail_blocks: int = 0
    every_n_steps: int = 0
    quality: str = "threshold"  # Block Cache's quality input: a target calibrates the threshold

    def applied_to(self, patcher):
        from fluxaccel.nodes.first_block_cache import ApplyBlockCache, ApplyFirstBlockCache

        node = ApplyBlockCache if self.block_cache else ApplyFirstBlockCache
        inputs = {i.id: i.default for i in node.define_schema().inputs if i.id != "model"}
        inputs["residual_diff_threshold"] = self.threshold
        if self.block_cache:
            inputs.update(taylor_order=self.taylor_order, probe_blocks=self.probe_blocks, tail_blocks=self.tail_blocks,
                          every_n_steps=self.every_n_steps, quality=self.quality)
        return node.execute(patcher, **inputs).result[0]

    def describe(self) -> str:
        if not self.block_cache:
            return f"First Block Cache {self.threshold:.2f}"
        decision = (f"every {self.every_n_steps} steps" if self.every_n_steps else
                    self.quality if self.quality != "threshold" else f"{self.threshold:.2f}")
        return f"F{self.probe_blocks}B{self.tail_blocks}, order {self.taylor_order}, {decision}"


def block_cache_settings():
    """The Block Cache table's settings (see BLOCK_CACHE_THRESHOLDS and the lines after it)."""
    settings = [CacheSetting(threshold, True, order, probe, tail) for probe, tail in BLOCK_CACHE_LAYOUTS
                for order in TAYLOR_ORDERS for threshold in BLOCK_CACHE_THRESHOLDS]
    return settings + [CacheSetting(0.0, True, order, every_n_steps=every) for every in FIXED_SCHEDULES
                       for order in TAYLOR_ORDERS]


# ---------------------------------------------------------------------------------------------
# Does the model draw what it is asked?

def templates(world: ShapesWorld, latent_format):
    """The canonical drawing of every condition, in KSampler's output space."""
    return latent_format.process_out(train_tiny_flux.draw(ALL_CONDITIONS, world))


def pattern(latents):
    """Per-channel mean removed (the background tone varies per image), flattened, unit length."""
    centred = latents - latents.mean(dim=(-2, -1), keepdim=True)
    flat = centred.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True)


def template_similarities(latent, world: ShapesWorld, latent_format):
    """Cosine similarity of one sampled latent with every condition's template (ALL_CONDITIONS order)."""
    return (pattern(templates(world, latent_format)) @ pattern(latent[None])[0]).tolist()


def recognised_condition(latent, world: ShapesWorld, latent_format) -> Condition:
    similarities = template_similarities(latent, world, latent_format)
    return ALL_CONDITIONS[max(range(len(similarities)), key=similarities.__getitem__)]


def spread_conditions(count):
    """`count` prompts that between them vary every shape, colour and position."""
    picks = [Condition(SHAPES[j % len(SHAPES)], COLOURS[j % len(COLOURS)], POSITIONS[(j // 4 + j) % len(POSITIONS)])
             for j in range(count)]
    assert len(set(picks)) == len(picks)
    return picks


# ---------------------------------------------------------------------------------------------
# The cache curve

@dataclasses.dataclass(frozen=True)
class CurvePoint:
    setting: CacheSetting
    skipped_fraction: float  # mean over cases of reused / total steps
    mean_psnr: float
    min_psnr: float
    mean_ssim: float
    cases: int

    @property
    def threshold(self) -> float:
        return self.setting.threshold

    def qualifies(self) -> bool:
        return self.skipped_fraction >= MIN_SKIPPED_FRACTION and self.mean_psnr >= MIN_MEAN_PSNR_DB

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self.setting), "skipped_fraction": round(self.skipped_fraction, 4),
                "mean_psnr_db": round(self.mean_psnr, 2), "min_psnr_db": round(self.min_psnr, 2),
                "mean_ssim": round(self.mean_ssim, 5), "cases": self.cases}


def sample_cached(patcher, setting: CacheSetting, condition, seed, world, steps):
    """(latent, skipped fraction) of one cached run, the fraction read from the node's log report."""
    with CacheReportRecorder() as recorder:
        latent = ksample(setting.applied_to(patcher), condition, seed, world, steps)
    [(computed, total, reused)] = recorder.reports
    if total != steps or computed + reused != total:
        raise AssertionError(f"unexpected cache report {computed}/{total}, {reused}/{total} for {steps} steps")
    return latent, reused / total


def cases_of(conditions, seeds):
    return [(condition, seed) for condition in conditions for seed in seeds]


def reference_samples(model: ShapesModel, cases, steps=STEPS):
    """The uncached latent of every (condition, seed) case."""
    return {case: ksample(model.patcher, *case, model.world, steps) for case in cases}


def cache_curve(settings, seeds, conditions, steps=STEPS, model: ShapesModel = None, references=None, log=None):
    """For each setting (a CacheSetting, or a First Block Cache threshold): skipped share of steps, PSNR
    (mean, min) and mean SSIM against the uncached images.

    Every (condition, seed) pair is one case; its uncached reference is sampled once (or passed in
    `references`, as `reference_samples` gives them).
    """
    model = model if model is not None else load_shapes_model()
    cases = cases_of(conditions, seeds)
    references = references if references is not None else reference_samples(model, cases, steps)
    points = []
    for setting in settings:
        setting = setting if isinstance(setting, CacheSetting) else CacheSetting(setting)
        skipped, psnrs, ssims = [], [], []
        for case in cases:
            latent, fraction = sample_cached(model.patcher, setting, *case, model.world, steps)
            skipped.append(fraction)
            psnrs.append(psnr(latent, references[case]))
            ssims.append(ssim(latent, references[case]))
        point = CurvePoint(setting, statistics.fmean(skipped), statistics.fmean(psnrs), min(psnrs),
                           statistics.fmean(ssims), len(cases))
        points.append(point)
        if log:
            log(format_row(point))
    return points


def recommended_threshold(points):
    """The qualifying threshold that skips most, preferring FLUX.1-dev's usual range when one there qualifies."""
    qualifying = [p for p in points if p.qualifies()]
    in_practice = [p for p in qualifying if FLUX_DEV_PRACTICE[0] <= p.threshold <= FLUX_DEV_PRACTICE[1]]
    candidates = in_practice or qualifying
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.skipped_fraction, p.threshold)).threshold


def recommended_block_cache(points, reference: CurvePoint):
    """Block Cache's default: on the first block alone (F1B0, as cheap per step as First Block Cache on
    any model), thresholded, the setting that skips most steps at a mean PSNR no lower than First Block
    Cache's default (`reference`); ties in skipping go to the higher PSNR, then to the lower order
    when within ORDER_TIE_DB."""
    candidates = [p for p in points if p.setting.block_cache and not p.setting.every_n_steps
                  and (p.setting.probe_blocks, p.setting.tail_blocks) == (1, 0) and p.mean_psnr >= reference.mean_psnr]
    if not candidates:
        return None
    most = max(p.skipped_fraction for p in candidates)
    tied = [p for p in candidates if p.skipped_fraction == most]
    best = max(p.mean_psnr for p in tied)
    return min((p for p in tied if p.mean_psnr >= best - ORDER_TIE_DB),
               key=lambda p: (p.setting.taylor_order, -p.mean_psnr))


def bar_check(points, reference: CurvePoint):
    """How the best Block Cache settings compare with First Block Cache's default (`reference`):
    (most skipped at its PSNR or better, best PSNR at its skipped share or more), each a CurvePoint or None."""
    block = [p for p in points if p.setting.block_cache]
    as_faithful = [p for p in block if p.mean_psnr >= reference.mean_psnr]
    as_fast = [p for p in block if p.skipped_fraction >= reference.skipped_fraction]
    return (max(as_faithful, key=lambda p: (p.skipped_fraction, p.mean_psnr), default=None),
            max(as_fast, key=lambda p: (p.mean_psnr, p.skipped_fraction), default=None))


# ---------------------------------------------------------------------------------------------
# Report

def format_db(value):
    return "identical" if math.isinf(value) else f"{value:.1f}"


def format_row(point: CurvePoint):
    first_cell = point.setting.describe() if point.setting.block_cache else f"{point.threshold:.2f}"
    return (f"| {first_cell} | {100 * point.skipped_fraction:.1f} % | {format_db(point.mean_psnr)} | "
            f"{format_db(point.min_psnr)} | {point.mean_ssim:.4f} | {'yes' if point.qualifies() else 'no'} |")


def recognition_summary(model: ShapesModel, references):
    """(recognised, total): uncached samples whose nearest template is the asked condition."""
    latent_format = model.patcher.model.latent_format
    hits = sum(recognised_condition(latent, model.world, latent_format) == condition
               for (condition, _), latent in references.items())
    return hits, len(references)


def device_description():
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    name = platform.processor() or platform.machine()
    return f"{device} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def pack_revision(pack_dir):
    """The measured pack's git commit, naming node or kernel files that differ from it."""
    import subprocess

    def git(*arguments):
        done = subprocess.run(["git", "-C", pack_dir, *arguments], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "nodes", "kernels", "__init__.py").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return f"{pack_dir} (not a git checkout)"
    if changed:
        return f"commit {commit} with uncommitted changes to {', '.join(line[3:] for line in changed)}"
    return f"commit {commit}"


def ordinal(number) -> str:
    suffixes = {1: "st", 2: "nd", 3: "rd"}
    return f"{number}{suffixes.get(number if number < 20 else number % 10, 'th')}"


def calibration_points(model: ShapesModel, seeds, conditions, steps, references, log=None):
    """Per quality target of Block Cache (at its default order and layout): (calibrated threshold, the
    target's CurvePoint on the cases), the threshold calibrated on the calibration image alone."""
    from fluxaccel.nodes import first_block_cache

    calibration_case = (spread_conditions(CALIBRATION_CONDITION_INDEX + 1)[-1], CALIBRATION_SEED)
    results = []
    for quality, target in first_block_cache.QUALITY_TARGETS.items():
        if target is None:
            continue
        setting = CacheSetting(0.0, True, 1, quality=quality)
        first_block_cache.forget_calibrations()
        with CacheReportRecorder() as recorder:
            ksample(setting.applied_to(model.patcher), *calibration_case, model.world, steps)
        [threshold] = recorder.calibrated_thresholds
        [point] = cache_curve([setting], seeds, conditions, steps, model, references, log=log)
        results.append((threshold, point))
    return calibration_case, results


def calibration_section(calibration_case, calibrations):
    (condition, seed) = calibration_case
    lines = ["### Quality targets", "",
             f"Apply Block Cache's `quality` input at its default order and layout: the threshold calibrated on one "
             f"image (\"{condition.prompt()}\", seed {seed}: neither among the cases above), then measured on the "
             "table's cases (tests/test_fidelity.py holds each within 2 dB of its target on held-out seeds).", "",
             "| quality | calibrated threshold | skipped steps | mean PSNR (dB) | min PSNR (dB) | mean SSIM |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {point.setting.quality} | {threshold:.3f} | {100 * point.skipped_fraction:.1f} % | "
              f"{format_db(point.mean_psnr)} | {format_db(point.min_psnr)} | {point.mean_ssim:.4f} |"
              for threshold, point in calibrations]
    return lines


def block_cache_section(block_points, reference: CurvePoint, results_name):
    """FIDELITY.md's Block Cache part: the table, the comparison with First Block Cache's default, the default."""
    as_faithful, as_fast = bar_check(block_points, reference)
    default = recommended_block_cache(block_points, reference)
    thresholds = ", ".join(f"{t:.2f}" for t in BLOCK_CACHE_THRESHOLDS)
    lines = [
        "## Block Cache",
        "",
        "Apply Block Cache on the same cases: Taylor orders 0, 1, 2 (order 0 reuses the stored residual, as First "
        "Block Cache does), probe/tail layouts " + ", ".join(f"F{p}B{t}" for p, t in BLOCK_CACHE_LAYOUTS)
        + f" at thresholds {thresholds}, and fixed schedules computing every "
        + " or ".join(ordinal(n) for n in FIXED_SCHEDULES) + " step (F1B0). "
        f"Raw JSON: [docs/results/{results_name}](results/{results_name}).",
        "",
        "| setting | skipped steps | mean PSNR (dB) | min PSNR (dB) | mean SSIM | qualifies |",
        "| --- | --- | --- | --- | --- | --- |",
        *[format_row(p) for p in block_points],
        "",
        "### Against First Block Cache's default",
        "",
        f"First Block Cache {reference.threshold:.2f} (its default): {100 * reference.skipped_fraction:.1f} % of the "
        f"steps skipped at a mean PSNR of {reference.mean_psnr:.1f} dB on these cases.",
    ]
    if as_faithful is not None:
        lines.append(f"- At that PSNR or better, the setting that skips most is {as_faithful.setting.describe()}: "
                     f"{100 * as_faithful.skipped_fraction:.1f} % skipped "
                     f"({as_faithful.skipped_fraction / reference.skipped_fraction:.2f}x), {as_faithful.mean_psnr:.1f} dB.")
    if as_fast is not None:
        lines.append(f"- At that share of skipped steps or more, the most faithful is {as_fast.setting.describe()}: "
                     f"{as_fast.mean_psnr:.1f} dB ({as_fast.mean_psnr - reference.mean_psnr:+.1f} dB), "
                     f"{100 * as_fast.skipped_fraction:.1f} % skipped.")
    met = ((as_faithful is not None and as_faithful.skipped_fraction >= BAR_SKIP_RATIO * reference.skipped_fraction)
           or (as_fast is not None and as_fast.mean_psnr >= reference.mean_psnr + BAR_PSNR_GAIN_DB))
    lines += [f"- The bar (at least {BAR_SKIP_RATIO}x the skipped steps at that PSNR, or at least "
              f"{BAR_PSNR_GAIN_DB:.0f} dB closer at that share): {'met' if met else 'not met'}.", ""]
    lines += ["### Block Cache's default", ""]
    if default is None:
        lines.append("No F1B0 setting reaches First Block Cache's default PSNR.")
    else:
        lines.append(f"**{default.setting.describe()}** ({100 * default.skipped_fraction:.1f} % skipped, "
                     f"{default.mean_psnr:.1f} dB): on the first block alone (F1B0: as cheap per step as First Block "
                     "Cache on any model), thresholded, the setting that skips most steps at a mean PSNR no lower than "
                     f"First Block Cache's default; ties go to the higher PSNR, then to the lower order within "
                     f"{ORDER_TIE_DB:.0f} dB (it extrapolates less far from measured residuals). tests/test_fidelity.py "
                     "asserts the node's default on seeds held out from this table.")
    return lines


def render_docs(points, model: ShapesModel, command, recognition, conditions, seeds, steps, seconds, pack_dir=PACK_DIR,
                block_points=(), results_name=None, calibrations=None):
    recommended = recommended_threshold(points)
    qualifying = [f"{p.threshold:.2f}" for p in points if p.qualifies()]
    hits, total = recognition
    lines = [
        "# First Block Cache and Block Cache fidelity",
        "",
        "How far Apply First Block Cache and Apply Block Cache move FLUX's sampled images from the uncached ones.",
        "Generated by `bench/fidelity/caches.py`; every number below is measured by that run.",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Device: {device_description()}; the run took {seconds:.0f} s",
        f"- Model: `{os.path.relpath(model.path, PACK_DIR)}`, {model.describe()}.",
        f"- Sampling: ComfyUI's KSampler node, {steps} steps, Euler, scheduler \"simple\", cfg 1.0, FLUX guidance "
        f"{model.metadata['guidance']} in the conditioning, 16-channel latents.",
        f"- Cache: the pack's Apply First Block Cache node ({pack_revision(pack_dir)}) at each threshold, and its "
        "Apply Block Cache node at each setting of the table below; inputs not named at their defaults; skipped "
        "share of steps from the nodes' own log reports.",
        f"- Cases: {len(conditions)} prompts x {len(seeds)} seeds (seeds {', '.join(map(str, seeds))}): "
        + "; ".join(f'"{c.prompt()}"' for c in conditions) + ".",
        f"- The model draws what it is asked: {hits}/{total} uncached samples have the asked prompt's drawing as "
        f"nearest template (cosine similarity, per-channel means removed) among all {len(ALL_CONDITIONS)} prompts.",
        "",
        "## Curve",
        "",
        "PSNR: peak = dynamic range (max - min) of the uncached reference latent. SSIM: Gaussian window "
        f"{SSIM_WINDOW} px, sigma {SSIM_SIGMA}, per channel, averaged. \"identical\": the cached run reused no step.",
        f"Qualifies: skips at least {100 * MIN_SKIPPED_FRACTION:.0f} % of the steps with mean PSNR at least "
        f"{MIN_MEAN_PSNR_DB:.0f} dB.",
        "",
        "| threshold | skipped steps | mean PSNR (dB) | min PSNR (dB) | mean SSIM | qualifies |",
        "| --- | --- | --- | --- | --- | --- |",
        *[format_row(p) for p in points],
        "",
        "## Recommended default",
        "",
    ]
    if recommended is None:
        lines.append("No measured threshold qualifies.")
    else:
        lines.append(f"**{recommended:.2f}**: of the qualifying thresholds ({', '.join(qualifying)}), the one that "
                     f"skips most, preferring FLUX.1-dev's usual range {FLUX_DEV_PRACTICE[0]}-{FLUX_DEV_PRACTICE[1]} "
                     "when a threshold there qualifies. tests/test_fidelity.py holds the node's default to what this "
                     "table measures for it, less a margin, on seeds held out from this table.")
    if block_points:
        [reference] = [p for p in points if p.threshold == node_default_threshold()] or [None]
        lines += [""] + (block_cache_section(block_points, reference, results_name) if reference is not None else
                         ["First Block Cache's default threshold is not on the curve: no Block Cache comparison."])
    if calibrations is not None:
        lines += [""] + calibration_section(*calibrations)
    smallest = min(points, key=lambda p: p.threshold)
    if smallest.skipped_fraction >= 0.9:
        lines += ["", f"Warning: even the smallest threshold ({smallest.threshold:.2f}) skips nearly every step. On a "
                  "trained model the first block's residual changes every step, so the node is reading that change "
                  "as zero (see tests/test_fidelity.py::test_tiny_threshold_reuses_almost_nothing)."]
    lines += [
        "",
        "## Limits",
        "",
        "- LPIPS is not reported: no usable offline LPIPS package is available in this environment, and LPIPS needs "
        "pretrained network weights that would have to be downloaded.",
        "- The metrics compare latents, not decoded pixels: the model is a 16-channel latent model with no VAE.",
        "- The model is small and trained on simple drawings, so its residuals change more smoothly between steps "
        "than FLUX.1-dev's may (which favours Taylor predictions); the curves show the nodes' behaviour on a trained "
        "FLUX of ComfyUI's own classes, not FLUX.1-dev's exact numbers.",
        "- The skipped share is not the speed-up: each step still runs the probe and tail blocks (on this 6-block "
        "model F2B1 runs half the blocks of a skipped step; on FLUX.1-dev's 57, 3).",
        "",
    ]
    return "\n".join(lines)


def node_default_threshold():
    from fluxaccel.nodes.first_block_cache import ApplyFirstBlockCache

    [threshold] = [i.default for i in ApplyFirstBlockCache.define_schema().inputs if i.id == "residual_diff_threshold"]
    return threshold


def dated_results_name(measurement):
    """The raw JSON's file name in docs/results: today's date, the device type and what was measured."""
    import comfy.model_management

    device_type = comfy.model_management.get_torch_device().type
    return f"{datetime.date.today().isoformat()}-{device_type}-{measurement}-trained-tiny-flux.json"


def results_json(points, block_points, calibrations, model: ShapesModel, command, conditions, seeds, steps,
                 pack_dir=PACK_DIR):
    reference = next(p for p in points if p.threshold == node_default_threshold())
    default = recommended_block_cache(block_points, reference)
    as_faithful, as_fast = bar_check(block_points, reference)
    return {
        "command": command, "device": device_description(), "pack": pack_revision(pack_dir), "model": model.describe(),
        "cases": {"prompts": [c.prompt() for c in conditions], "seeds": list(seeds), "steps": steps},
        "first_block_cache": [p.as_json() for p in points],
        "block_cache": [p.as_json() for p in block_points],
        "first_block_cache_default": reference.as_json(),
        "block_cache_default": None if default is None else default.as_json(),
        "most_skipped_at_first_block_cache_default_psnr": None if as_faithful is None else as_faithful.as_json(),
        "best_psnr_at_first_block_cache_default_skipping": None if as_fast is None else as_fast.as_json(),
        "quality_targets": None if calibrations is None else {
            "calibration_image": {"prompt": calibrations[0][0].prompt(), "seed": calibrations[0][1]},
            "targets": [{"calibrated_threshold": round(threshold, 4), **point.as_json()}
                        for threshold, point in calibrations[1]]},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="First Block Cache and Block Cache fidelity on the trained tiny FLUX.")
    parser.add_argument("--write-docs", action="store_true", help=f"write {os.path.relpath(DOCS_PATH, PACK_DIR)}")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    parser.add_argument("--no-block-cache", action="store_true", help="only First Block Cache's curve")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--conditions", type=int, default=DEFAULT_CONDITION_COUNT, help="how many prompts")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--comfyui", default=train_tiny_flux.DEFAULT_COMFYUI_DIR)
    parser.add_argument("--pack", default=PACK_DIR,
                        help="the pack checkout whose node is measured (e.g. a candidate fix)")
    args = parser.parse_args(argv)

    setup_comfyui(args.comfyui, args.pack)
    torch.set_num_threads(train_tiny_flux.THREADS)
    started = time.time()
    model = load_shapes_model(args.weights)
    conditions = spread_conditions(args.conditions)
    references = reference_samples(model, cases_of(conditions, args.seeds), args.steps)
    recognition = recognition_summary(model, references)
    print(f"recognised {recognition[0]}/{recognition[1]} uncached samples")
    print("| threshold | skipped steps | mean PSNR (dB) | min PSNR (dB) | mean SSIM | qualifies |")
    points = cache_curve(args.thresholds, args.seeds, conditions, args.steps, model, references, log=print)
    print(f"recommended default: {recommended_threshold(points)}")
    block_points = [] if args.no_block_cache else cache_curve(block_cache_settings(), args.seeds, conditions,
                                                              args.steps, model, references, log=print)
    calibrations = None if args.no_block_cache else calibration_points(model, args.seeds, conditions, args.steps,
                                                                       references, log=print)
    if args.write_docs:
        command = ("python -m bench.fidelity.caches " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        results_name = dated_results_name("cache-fidelity")
        if block_points:
            os.makedirs(RESULTS_DIR, exist_ok=True)
            with open(os.path.join(RESULTS_DIR, results_name), "w") as f:
                json.dump(results_json(points, block_points, calibrations, model, command, conditions, args.seeds,
                                       args.steps, args.pack), f, indent=1)
        text = render_docs(points, model, command, recognition, conditions, args.seeds, args.steps,
                           time.time() - started, args.pack, block_points, results_name, calibrations)
        os.makedirs(os.path.dirname(DOCS_PATH), exist_ok=True)
        with open(DOCS_PATH, "w") as f:
            f.write(text)
        print(f"wrote {DOCS_PATH}")


if __name__ == "__main__":
    main()
