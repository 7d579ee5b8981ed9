"""Apply First Block Cache and Apply Block Cache: skip FLUX's middle blocks on steps where the first
blocks' output barely moved, reusing or predicting the skipped blocks' residual.

First Block Cache is the first block as the probe, the other 56 blocks skipped and their last
residual reused. Block Cache generalizes it (cache-dit's DBCache with a TaylorSeer-style predictor):
the first `probe_blocks` decide, the last `tail_blocks` always run, the skipped residual is predicted
by a Taylor step in sigma (order 1 or 2), and `every_n_steps` may replace the threshold by a fixed
schedule. The math is kernels/residual_cache.py.

Hook-up, all through ComfyUI's extension points:
- `patches_replace["dit"]` entries for the probe and skipped blocks: the first block keeps its input,
  the last probe block decides, the skipped ones pass through when skipping, and the last skipped
  block gives the predicted hidden state (or, when computing, stores the residual). A replacement
  that was already there (another pack's) is kept and called to run its block.
- an OUTER_SAMPLE wrapper gives every sampling run a fresh cache and reports what it did;
- a CALC_COND_BATCH wrapper marks each model evaluation, so cond and uncond share one decision.
Under Compile FLUX's CUDA graphs the last probe block splits each captured forward where it decides:
the graphs up to its distance, then either the skipped blocks' or the prediction's, then the tail and
the rest (kernels/compile/cuda_graphs.py); the stored residuals live in tensors kept outside the graphs.
"""
import dataclasses
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch
from typing_extensions import override

import comfy.patcher_extension
from comfy_api.latest import ComfyExtension, io

from ..kernels.compile.cuda_graphs import Recording, host_decision
from ..kernels.residual_cache import (CALIBRATION_HALVINGS, CachePolicy, PredictionState, ResidualCache,
                                      calibrated_threshold, distance_sums, latent_psnr, taylor_differences,
                                      taylor_prediction)
from . import CATEGORY, comfy_contract, flux_layout
from .patcher_hooks import keep_conds_on_device, set_wrapper
from .reporting import report_run, report_to_sampler_node

SETTINGS_KEY = "fluxaccel.first_block_cache"
RUN_KEY = "fluxaccel.first_block_cache.run"
FORWARD_KEY = "fluxaccel.first_block_cache.forward"
WRAPPER_KEY = "fluxaccel.first_block_cache"

NODE_NAME = comfy_contract.FIRST_BLOCK_CACHE
BLOCK_CACHE_NODE_NAME = comfy_contract.BLOCK_CACHE
# The alternatives of a captured forward after its probe blocks.
COMPUTE, REUSE = "compute", "reuse"
# Block Cache's quality input: the threshold as set, or a target PSNR (dB, the sampled latent against the
# uncached one of the same seed) that a calibration on the user's model and schedule turns into one.
QUALITY_TARGETS = {"threshold": None, "quality (50 dB)": 50.0, "balanced (44 dB)": 44.0, "fast (38 dB)": 38.0}


@dataclass(frozen=True)
class CacheLayout:
    """Which blocks probe and which always run: the first `probe_blocks` run every step and their
    residual decides; the last `tail_blocks` run every step after the skipped ones."""
    probe_blocks: int = 1
    tail_blocks: int = 0

    def problem(self, double_blocks, single_blocks) -> Optional[str]:
        total = double_blocks + single_blocks
        if double_blocks == 0 or single_blocks == 0:
            return f"needs a FLUX with double and single blocks; this one has {double_blocks} and {single_blocks}"
        if self.probe_blocks < 1 or self.tail_blocks < 0 or self.probe_blocks + self.tail_blocks >= total:
            return (f"probe_blocks ({self.probe_blocks}) + tail_blocks ({self.tail_blocks}) must leave at least one "
                    f"of the model's {total} blocks to skip, with probe_blocks at least 1")
        return None

    def name(self) -> str:
        """cache-dit's notation: F<probe>B<tail>."""
        return f"F{self.probe_blocks}B{self.tail_blocks}"


@dataclass(frozen=True)
class CacheSettings:
    policy: CachePolicy
    layout: CacheLayout
    start_percent: float
    end_percent: float
    name: str  # "First Block Cache" or "Block Cache", as the reports call it
    details: str  # the settings the run's report shows after the name
    target_db: Optional[float] = None  # a quality target, calibrated into the threshold


_cache_run_serials = itertools.count()


@dataclass
class CacheRun:
    """One sampling run: the cache and the sigma window in which reuse is allowed."""
    cache: ResidualCache
    start_sigma: float
    end_sigma: float
    name: str = "First Block Cache"
    # Every run its own, calibration passes included: what other processes mirroring it tell runs apart by.
    serial: int = field(default_factory=lambda: next(_cache_run_serials))
    # Each conditioning's slot, numbered as the run first meets it (cond, then uncond).
    key_slots: dict = field(default_factory=dict)

    def graph_signature(self, transformer_options) -> tuple:
        """What a forward captured in CUDA graphs depends on in this run: which slots its rows hold (each
        captured forward keeps the cached residuals of its own rows), not the run. Runs that meet their
        conditionings in the same order replay each other's graphs."""
        keys = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or ()
        return tuple(self.key_slots.setdefault(key, len(self.key_slots)) for key in keys)


def conditioning_keys(transformer_options, batch_size) -> list[Hashable]:
    """One key per conditioning in the batch (ComfyUI's cond uuids), so each is cached on its own."""
    keys = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond")
    if not keys or batch_size % len(keys) != 0:
        return ["batch"]
    return list(keys)


def single_stream(out) -> torch.Tensor:
    """A block's output as one sequence, text tokens then image tokens (a double block's two streams joined)."""
    return torch.cat((out["txt"], out["img"]), dim=1) if "txt" in out else out["img"]


def in_block_layout(hidden, text_tokens, double) -> dict:
    """`hidden` (text then image tokens) as a block of that kind returns it."""
    if double:
        return {"txt": hidden[:, :text_tokens].contiguous(), "img": hidden[:, text_tokens:].contiguous()}
    return {"img": hidden}


@dataclass
class CapturedResiduals:
    """A forward captured in CUDA graphs under the cache: the tensors its graphs share, and the host
    code that runs between them at each replay.

    The first segment leaves this call's probe residual and its distance to the stored one in
    `probe_residual` and `distance_sums`; `choose` reads the distance when the step's decision needs
    it and picks the alternative: COMPUTE runs the skipped blocks and updates the stored tensors;
    REUSE adds the prediction to the probe output. The stored tensors and the coefficients the host
    fills in for the Taylor terms are kept outside the graphs' memory, as later calls read them."""
    probe_residual: torch.Tensor
    distance_sums: torch.Tensor
    probe_references: torch.Tensor
    state: PredictionState
    coefficients: Optional[torch.Tensor]  # prediction coefficients (orders 1, 2)
    factors: Optional[torch.Tensor]  # divided-difference factors (orders 1, 2)
    order: int

    @classmethod
    def record(cls, recording: Recording, probe_residual, probe_hidden, reduce_sums, order):
        """Recorded in the first segment, after the probe blocks."""
        def kept(name, like, dtype=None, shape=None):
            return recording.kept_tensor(f"block cache: {name}", like.shape if shape is None else shape,
                                         dtype or like.dtype, like.device)

        state = PredictionState(kept("residuals", probe_hidden))
        coefficients = factors = None
        if order >= 1:
            state.slope = kept("slopes", probe_hidden, torch.float32)
            state.curvature = kept("curvatures", probe_hidden, torch.float32) if order >= 2 else None
            scalars = (2, probe_hidden.shape[0], 1, 1)
            coefficients = kept("prediction coefficients", probe_hidden, torch.float32, scalars)
            factors = kept("difference factors", probe_hidden, torch.float32, scalars)
        probe_references = kept("probe residuals", probe_residual)
        return cls(probe_residual, distance_sums(probe_residual, probe_references, reduce_sums), probe_references,
                   state, coefficients, factors, order)

    def keys(self, transformer_options) -> list:
        return conditioning_keys(transformer_options, self.probe_residual.shape[0])

    def hand_in(self, transformer_options):
        """Before a replay: what launched calls stored outside this forward's tensors goes in."""
        run: CacheRun = transformer_options[RUN_KEY]
        run.cache.copy_stored_into(self.keys(transformer_options), self.probe_references, self.state)

    def choose(self, transformer_options) -> str:
        run: CacheRun = transformer_options[RUN_KEY]
        keys, rows, device = self.keys(transformer_options), self.probe_residual.shape[0], self.probe_residual.device
        if run.cache.should_reuse(keys, self.probe_residual, measured_sums=self.distance_sums):
            run.cache.prediction_coefficients(keys, rows, device, out=self.coefficients)
            return REUSE
        if self.order >= 1:
            run.cache.difference_factors(keys, rows, device, out=self.factors)
        # The COMPUTE graphs write what these views show.
        run.cache.store_views(keys, self.probe_references, self.state)
        return COMPUTE

    def record_compute_end(self, recording: Recording, end_hidden, probe_hidden, text_tokens, out):
        """Recorded after the last skipped block: the stored tensors' update; then the REUSE alternative,
        which leaves the predicted hidden state in `out` (the block's own output tensors), and the rest."""
        state = self.state
        residual = torch.sub(end_hidden, probe_hidden)
        if self.order >= 1:
            slope, curvature = taylor_differences(residual, state.residual, state.slope, self.factors, self.order)
            if curvature is not None:
                state.curvature.copy_(curvature)
            state.slope.copy_(slope)
        state.residual.copy_(residual)
        self.probe_references.copy_(self.probe_residual)

        def record_reuse():
            predicted = probe_hidden + taylor_prediction(state.residual, state.slope, state.curvature,
                                                         self.coefficients, self.order)
            for name, tensor in in_block_layout(predicted, text_tokens, "txt" in out).items():
                out[name].copy_(tensor)
        recording.join({REUSE: record_reuse})


@dataclass
class ForwardPlan:
    """What the probe blocks found, for the blocks after them, within one diffusion-model call."""
    run: CacheRun
    # The image tokens entering the first block (ComfyUI's blocks add to their inputs in place, so a copy)
    # and how many text tokens precede them in the single stream.
    image_input: torch.Tensor
    text_tokens: int
    keys: Optional[list] = None
    reuse: bool = False
    # The probe's output in the single-stream layout (text tokens, then image tokens), copied.
    probe_hidden: Optional[torch.Tensor] = None
    # While the call is captured in CUDA graphs: the recording and its residuals (the graphs decide).
    recorded: Optional[tuple[Recording, CapturedResiduals]] = None


@dataclass(frozen=True)
class BlockRole:
    """What the cache does at one block: `first` keeps the input, `decides` ends the probe, `skippable`
    blocks pass through on a reused step and `last_skipped` gives the predicted hidden state."""
    first: bool = False
    decides: bool = False
    skippable: bool = False
    last_skipped: bool = False
    double: bool = True


class CacheBlock:
    """A `patches_replace["dit"]` entry for one FLUX block under the cache."""

    def __init__(self, role: BlockRole, previous_replacement=None):
        # Another pack's replacement for this block stays in charge of running it.
        while isinstance(previous_replacement, CacheBlock):
            previous_replacement = previous_replacement.previous_replacement
        self.role = role
        self.previous_replacement = previous_replacement

    @property
    def graph_replayable(self) -> bool:
        """Whether a forward through this block replays from CUDA graphs: its host code decides only
        where it splits the recording; another pack's replacement inside it may decide anywhere."""
        return self.previous_replacement is None

    def run_block(self, args, extra):
        if self.previous_replacement is not None:
            return self.previous_replacement(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        options = args["transformer_options"]
        run: Optional[CacheRun] = options.get(RUN_KEY)
        if run is None:
            return self.run_block(args, extra)
        role = self.role
        if role.first:
            # `options` is forward_orig's own copy: the plan lives exactly as long as this call.
            options[FORWARD_KEY] = ForwardPlan(run, args["img"].clone(), args["txt"].shape[1])
        plan: ForwardPlan = options[FORWARD_KEY]
        if role.skippable and plan.reuse:
            if not role.last_skipped:
                return {name: args[name] for name in ("img", "txt") if name in args}
            predicted = plan.probe_hidden + run.cache.predicted_residual(plan.keys, plan.probe_hidden.device)
            return in_block_layout(predicted, plan.text_tokens, role.double)
        out = self.run_block(args, extra)
        if role.decides:
            self.decide(plan, out, options)
        elif role.last_skipped:
            end_hidden = single_stream(out)
            if plan.recorded is not None:
                recording, residuals = plan.recorded
                residuals.record_compute_end(recording, end_hidden, plan.probe_hidden, plan.text_tokens, out)
            else:
                run.cache.store_computed_residual(plan.keys, end_hidden - plan.probe_hidden)
        return out

    def decide(self, plan: ForwardPlan, out, options):
        """After the last probe block: measure its residual, decide (or, captured, split the recording there)."""
        run = plan.run
        image_output = out["img"] if self.role.double else out["img"][:, plan.text_tokens:]
        probe_residual = image_output - plan.image_input
        plan.keys = conditioning_keys(options, probe_residual.shape[0])
        sharded = options.get(flux_layout.SHARDED_FORWARD_KEY)
        reduce_sums = None
        if sharded is not None:
            # This rank holds a share of the image tokens, padded: measure the real ones, summed over ranks.
            probe_residual = probe_residual[:, :sharded.shard.image_tokens]
            reduce_sums = sharded.sum_across_ranks
        plan.probe_hidden = single_stream(out)
        graph_pass = options.get(flux_layout.GRAPH_PASS_KEY)
        if isinstance(graph_pass, Recording):
            residuals = CapturedResiduals.record(graph_pass, probe_residual, plan.probe_hidden, reduce_sums,
                                                 run.cache.order)
            graph_pass.on_replay(residuals.hand_in)
            graph_pass.branch(residuals.choose, COMPUTE, decider=run.name)
            plan.recorded = (graph_pass, residuals)
            return
        with host_decision(graph_pass):
            plan.reuse = run.cache.should_reuse(plan.keys, probe_residual, reduce_sums)
        if not plan.reuse:
            run.cache.store_probe_residual(plan.keys, probe_residual)


def block_positions(double_blocks, single_blocks) -> list[tuple[str, int]]:
    return [("double_block", i) for i in range(double_blocks)] + [("single_block", i) for i in range(single_blocks)]


def cache_block_replacements(double_blocks, single_blocks, layout: CacheLayout, dit_replacements):
    """`patches_replace["dit"]` entries for the probe and skipped blocks, keeping `dit_replacements`
    (others') inside; the tail blocks get none."""
    positions = block_positions(double_blocks, single_blocks)
    last_skipped = len(positions) - layout.tail_blocks - 1
    replacements = {}
    for index, position in enumerate(positions[:last_skipped + 1]):
        role = BlockRole(first=index == 0, decides=index == layout.probe_blocks - 1,
                         skippable=index >= layout.probe_blocks, last_skipped=index == last_skipped,
                         double=position[0] == "double_block")
        replacements[position] = CacheBlock(role, dit_replacements.get(position))
    return replacements


def install_cache_blocks(model_patcher, double_blocks, single_blocks, layout: CacheLayout):
    dit_replacements = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    replacements = cache_block_replacements(double_blocks, single_blocks, layout, dit_replacements)
    # Tail blocks under an earlier cache node's entries go back to what was there before it.
    for position in block_positions(double_blocks, single_blocks):
        if position not in replacements and isinstance(dit_replacements.get(position), CacheBlock):
            replacements[position] = dit_replacements[position].previous_replacement
    for position, replacement in replacements.items():
        if replacement is not None:
            model_patcher.set_model_patch_replace(replacement, "dit", *position)
    # set_model_patch_replace copied the clone's entries: this dict is its own.
    installed = model_patcher.model_options["transformer_options"]["patches_replace"]["dit"]
    for position in [position for position, replacement in replacements.items() if replacement is None]:
        del installed[position]


def start_model_evaluation(executor, *args, **kwargs):
    """CALC_COND_BATCH wrapper: one call per sampling-step evaluation, before any block runs."""
    arguments = comfy_contract.calc_cond_batch_arguments(args, kwargs)
    run: Optional[CacheRun] = arguments["model_options"]["transformer_options"].get(RUN_KEY)
    if run is not None:
        sigma = float(arguments["timestep"].max())
        run.cache.start_step(sigma, reuse_allowed=run.end_sigma <= sigma <= run.start_sigma)
    return executor(*args, **kwargs)


def sample_with_fresh_cache(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a new cache for every sampling run, reported and dropped at its end; with a
    quality target, the run's threshold calibrated first (once per model and schedule in a session)."""
    settings: CacheSettings = executor.class_obj.model_options["transformer_options"][SETTINGS_KEY]
    policy, calibration = settings.policy, ""
    if settings.target_db is not None:
        policy, calibration = calibrated_policy(executor, settings, args, kwargs)
    run, samples = sample_with_cache(executor, policy, settings, args, kwargs)
    report_run(f"{settings.name} ({settings.details}{calibration}): {run.cache.stats.summary()}")
    return samples


def sample_with_cache(executor, policy: CachePolicy, settings: CacheSettings, args, kwargs):
    """(the run, its samples): one sampling run under a fresh cache of `policy`."""
    guider = executor.class_obj
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    run = CacheRun(
        cache=ResidualCache(policy),
        start_sigma=model_sampling.percent_to_sigma(settings.start_percent),
        end_sigma=model_sampling.percent_to_sigma(settings.end_percent),
        name=settings.name,
    )
    original_options = guider.model_options
    guider.model_options = comfy_contract.model_options_clone(original_options)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        return run, executor(*args, **kwargs)
    finally:
        guider.model_options = original_options


# Thresholds calibrated in this session: per model, by the rest of what they were calibrated for.
_calibrations = weakref.WeakKeyDictionary()


def forget_calibrations():
    """Drops the thresholds calibrated in this session (the next run with a quality target calibrates
    again): for measurements of the calibration itself."""
    _calibrations.clear()


def calibrated_policy(executor, settings: CacheSettings, args, kwargs) -> tuple[CachePolicy, str]:
    """(the policy with the threshold calibrated for settings.target_db, what the run's report says of it).

    The calibration samples this run's inputs (noise, schedule, conditioning) uncached, then with
    thresholds bisected until the result is as close to the uncached one as asked; it holds for the
    model (with its weights as patched), the cache's other settings, the schedule and the latent's size."""
    guider = executor.class_obj
    model = guider.model_patcher.model
    arguments = comfy_contract.outer_sample_arguments(args, kwargs)
    noise, sigmas = arguments["noise"], arguments["sigmas"]
    # The patch set the run loads (LoRA and other weight patches): ComfyUI's ModelPatcher.patches_uuid.
    key = (guider.model_patcher.patches_uuid, dataclasses.replace(settings.policy, residual_diff_threshold=0.0),
           settings.layout, settings.start_percent, settings.end_percent, settings.target_db,
           tuple(sigmas.tolist()), tuple(noise.shape), getattr(guider, "cfg", None))
    calibrations = _calibrations.setdefault(model, {})
    if key in calibrations:
        return dataclasses.replace(settings.policy, residual_diff_threshold=calibrations[key]), (
            f", threshold {calibrations[key]:.3f} calibrated earlier this session")
    passes = []

    def sample_at(threshold):
        passes.append(threshold)
        report_to_sampler_node(f"{settings.name}: calibrating the threshold for {settings.target_db:.0f} dB, "
                               f"sampling pass {len(passes)} of at most {CALIBRATION_HALVINGS + 2}...", passing=True)
        policy = dataclasses.replace(settings.policy, residual_diff_threshold=threshold)
        return sample_with_cache(executor, policy, settings, args, kwargs)[1]

    reference = sample_at(0.0)
    threshold = calibrated_threshold(lambda candidate: latent_psnr(sample_at(candidate), reference), settings.target_db)
    calibrations[key] = threshold
    return dataclasses.replace(settings.policy, residual_diff_threshold=threshold), (
        f", threshold {threshold:.3f} calibrated in this run over {len(passes)} sampling passes")


def validate_window(start_percent, end_percent):
    # Naming inputs in validate_inputs takes them out of ComfyUI's own min/max check, so range them too.
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= value <= 1.0:
            return f"{name} must be between 0 and 1, got {value}."
    if start_percent > end_percent:
        return f"start_percent ({start_percent}) must not be greater than end_percent ({end_percent})."
    return True


def apply_cache(model, node_name, settings: CacheSettings):
    """A clone of `model` sampling under the cache `settings` describe."""
    diffusion_model = flux_layout.flux_diffusion_model(model, node_name)
    double_blocks, single_blocks = flux_layout.block_counts(diffusion_model)
    problem = settings.layout.problem(double_blocks, single_blocks)
    if problem is not None:
        raise ValueError(f"{node_name} {problem}.")
    patched = model.clone()
    patched.model_options["transformer_options"][SETTINGS_KEY] = settings
    install_cache_blocks(patched, double_blocks, single_blocks, settings.layout)
    for wrapper_type, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, sample_with_fresh_cache),
                                  (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, start_model_evaluation)):
        set_wrapper(patched, wrapper_type, WRAPPER_KEY, wrapper)
    keep_conds_on_device(patched)
    return patched


def window_inputs():
    return [
        io.Float.Input(
            "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
            tooltip=("Share of the sampling schedule after which skipping is allowed; the layout forms early, so a "
                     "later start keeps composition.")),
        io.Float.Input(
            "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
            tooltip="Share of the schedule after which skipping stops; lower keeps the final detail steps fully computed."),
        io.Int.Input(
            "max_consecutive_hits", default=0, min=0, max=1000,
            tooltip=("Most steps in a row that may reuse the cache before one is computed again (0 = no limit). "
                     "Lower bounds drift at some cost in speed.")),
    ]


class ApplyFirstBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FluxAccelFirstBlockCache",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "Runs FLUX's first transformer block every step; when its residual changed less than the "
                "threshold since the last computed step, the other blocks are skipped and their cached "
                "residual is reused. Steps computed and reused are shown on the sampler node."),
            inputs=[
                io.Model.Input("model", tooltip=flux_layout.MODEL_INPUT_TOOLTIP),
                io.Float.Input(
                    "residual_diff_threshold", default=0.12, min=0.0, max=1.0, step=0.01,
                    tooltip=("Relative change of the first block's residual below which a step reuses the cache. "
                             "Higher skips more steps (faster) and drifts further from the uncached image; "
                             "0 never skips (identical output).")),
                *window_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The same model, with First Block Cache applied while sampling.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        return validate_window(start_percent, end_percent)

    @classmethod
    def execute(cls, model, residual_diff_threshold, start_percent, end_percent, max_consecutive_hits) -> io.NodeOutput:
        settings = CacheSettings(CachePolicy(residual_diff_threshold, max_consecutive_hits), CacheLayout(),
                                 start_percent, end_percent, "First Block Cache", f"threshold {residual_diff_threshold}")
        return io.NodeOutput(apply_cache(model, NODE_NAME, settings))


def block_cache_details(policy: CachePolicy, layout: CacheLayout) -> str:
    decision = (f"every {policy.every_n_steps} steps" if policy.every_n_steps > 0
                else f"threshold {policy.residual_diff_threshold}")
    return f"{layout.name()}, order {policy.prediction_order}, {decision}"


class ApplyBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FluxAccelBlockCache",
            display_name=BLOCK_CACHE_NODE_NAME,
            category=CATEGORY,
            description=(
                "First Block Cache taken further (cache-dit's DBCache with a TaylorSeer-style predictor): the "
                "first blocks run every step and their residual decides whether the middle blocks are skipped; "
                "a skipped step predicts the middle blocks' residual from the last computed ones by a Taylor "
                "step in sigma, and the last blocks always run. Steps computed and reused are shown on the "
                "sampler node."),
            inputs=[
                io.Model.Input("model", tooltip=flux_layout.MODEL_INPUT_TOOLTIP),
                io.Combo.Input(
                    "quality", options=list(QUALITY_TARGETS), default="threshold",
                    tooltip=("threshold: skip by residual_diff_threshold. A target instead: how close (PSNR of the "
                             "sampled latent against the uncached one) the result must stay; the first run with a "
                             "model and schedule samples up to 7 extra times to find the threshold that keeps it, "
                             "and later runs in the session reuse it.")),
                io.Float.Input(
                    "residual_diff_threshold", default=0.22, min=0.0, max=1.0, step=0.01,
                    tooltip=("Relative change of the probe blocks' residual below which a step is skipped. Higher "
                             "skips more steps (faster) and drifts further from the uncached image; 0 never skips. "
                             "The default with Taylor order 1 skips more steps than First Block Cache's default at "
                             "no lower fidelity (docs/FIDELITY.md).")),
                io.Int.Input(
                    "taylor_order", default=1, min=0, max=2,
                    tooltip=("How a skipped step predicts the middle blocks' residual: 0 reuses the last one (First "
                             "Block Cache), 1 adds its slope in sigma, 2 also its curvature (from the last two or "
                             "three computed steps).")),
                *window_inputs(),
                io.Int.Input(
                    "probe_blocks", default=1, min=1, max=128, advanced=True,
                    tooltip=("Blocks run every step whose residual decides (DBCache's Fn); FLUX.1 has 19 double + "
                             "38 single.")),
                io.Int.Input(
                    "tail_blocks", default=0, min=0, max=128, advanced=True,
                    tooltip=("Last blocks run every step after the skipped ones (DBCache's Bn): they refine the "
                             "prediction.")),
                io.Int.Input(
                    "every_n_steps", default=0, min=0, max=100, advanced=True,
                    tooltip=("0: the threshold decides. n: compute every n-th step of the window and skip the ones "
                             "between, whatever the residual (a fixed schedule, FORA); the threshold is then unused.")),
            ],
            outputs=[io.Model.Output(tooltip="The same model, with Block Cache applied while sampling.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        return validate_window(start_percent, end_percent)

    @classmethod
    def execute(cls, model, quality, residual_diff_threshold, taylor_order, start_percent, end_percent,
                max_consecutive_hits, probe_blocks=1, tail_blocks=0, every_n_steps=0) -> io.NodeOutput:
        if quality not in QUALITY_TARGETS:
            raise ValueError(f"{BLOCK_CACHE_NODE_NAME}: quality must be one of {', '.join(QUALITY_TARGETS)}, "
                             f"not '{quality}'.")
        target_db = QUALITY_TARGETS[quality]
        if target_db is not None and every_n_steps > 0:
            raise ValueError(f"{BLOCK_CACHE_NODE_NAME}: a quality target calibrates the threshold, which every_n_steps "
                             "does not use; set quality to threshold or every_n_steps to 0.")
        policy = CachePolicy(residual_diff_threshold, max_consecutive_hits, taylor_order, every_n_steps)
        layout = CacheLayout(probe_blocks, tail_blocks)
        details = block_cache_details(policy, layout) if target_db is None else (
            f"{layout.name()}, order {taylor_order}, {target_db:.0f} dB target")
        settings = CacheSettings(policy, layout, start_percent, end_percent, "Block Cache", details, target_db)
        return io.NodeOutput(apply_cache(model, BLOCK_CACHE_NODE_NAME, settings))


class FirstBlockCacheExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ApplyFirstBlockCache, ApplyBlockCache]
