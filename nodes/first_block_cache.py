"""Apply First Block Cache: skip FLUX's remaining blocks on steps where the first block barely moved.

Hook-up, all through ComfyUI's extension points:
- `patches_replace["dit"]` entries for every double and single block: the first block decides,
  the middle blocks pass through when skipping, the last single block adds the cached residual.
  A replacement that was already there (another pack's) is kept and called to run its block.
- an OUTER_SAMPLE wrapper gives every sampling run a fresh cache and reports what it did;
- a CALC_COND_BATCH wrapper marks each model evaluation, so cond and uncond share one decision.
Under Compile FLUX's CUDA graphs the first block splits each captured forward where it decides: the
graphs up to its distance, then either the remaining blocks' or the cached residual's, then the
rest of the forward (kernels/cuda_graphs.py); the residuals live in the captured forward's tensors.
"""
from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch
from typing_extensions import override

import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import ComfyExtension, io

from ..kernels.cuda_graphs import Recording, host_decision
from ..kernels.first_block_cache import FirstBlockCache, distance_sums
from . import CATEGORY, flux_layout
from .patcher_hooks import keep_conds_on_device, set_wrapper
from .reporting import report_run

SETTINGS_KEY = "fluxaccel.first_block_cache"
RUN_KEY = "fluxaccel.first_block_cache.run"
FORWARD_KEY = "fluxaccel.first_block_cache.forward"
WRAPPER_KEY = "fluxaccel.first_block_cache"

NODE_NAME = "Apply First Block Cache"
# The alternatives of a captured forward after its first block.
COMPUTE, REUSE = "compute", "reuse"


@dataclass(frozen=True)
class CacheSettings:
    residual_diff_threshold: float
    start_percent: float
    end_percent: float
    max_consecutive_hits: int


@dataclass
class CacheRun:
    """One sampling run: the cache and the sigma window in which reuse is allowed."""
    cache: FirstBlockCache
    start_sigma: float
    end_sigma: float
    # Each conditioning's slot, numbered as the run first meets it (cond, then uncond).
    key_slots: dict = field(default_factory=dict)

    def graph_signature(self, transformer_options) -> tuple:
        """What a forward captured in CUDA graphs depends on in this run: which slots its rows hold (each
        captured forward keeps the cached residuals of its own rows), not the run. Runs that meet their
        conditionings in the same order replay each other's graphs."""
        keys = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or ()
        return tuple(self.key_slots.setdefault(key, len(self.key_slots)) for key in keys)


@dataclass
class CapturedResiduals:
    """A forward captured in CUDA graphs under First Block Cache: the tensors its graphs share, and the
    host code that runs between them at each replay.

    The first segment leaves this call's first residual and its distance to the stored one in
    `first_residual` and `distance_sums`; `choose` reads the distance when the step's decision needs
    it and picks the alternative: COMPUTE runs the remaining blocks and writes the residuals to store
    into `first_references` and `remaining`; REUSE adds `remaining` to the first block's output."""
    first_residual: torch.Tensor
    distance_sums: torch.Tensor
    first_references: torch.Tensor  # kept across calls, outside the graphs' memory
    remaining: torch.Tensor  # kept across calls, outside the graphs' memory

    @classmethod
    def record(cls, recording: Recording, first_residual, first_hidden, reduce_sums):
        """Recorded in the first segment, after the first block."""
        first_references = recording.kept_tensor(f"{NODE_NAME}: first residuals", first_residual)
        remaining = recording.kept_tensor(f"{NODE_NAME}: remaining residuals", first_hidden)
        return cls(first_residual, distance_sums(first_residual, first_references, reduce_sums), first_references,
                   remaining)

    def keys(self, transformer_options) -> list:
        return conditioning_keys(transformer_options, self.first_residual.shape[0])

    def hand_in(self, transformer_options):
        """Before a replay: residuals stored outside this forward's tensors (by launched calls) go in."""
        run: CacheRun = transformer_options[RUN_KEY]
        run.cache.copy_stored_into(self.keys(transformer_options), self.first_references, self.remaining)

    def choose(self, transformer_options) -> str:
        run: CacheRun = transformer_options[RUN_KEY]
        keys = self.keys(transformer_options)
        if run.cache.should_reuse(keys, self.first_residual, measured_sums=self.distance_sums):
            return REUSE
        # The COMPUTE graphs write what these views show.
        run.cache.store_first_residual(keys, self.first_references)
        run.cache.store_remaining_residual(keys, self.remaining)
        return COMPUTE

    def record_compute_end(self, recording: Recording, last_output: torch.Tensor, first_hidden: torch.Tensor):
        """Recorded after the last block: the residuals to store; then the REUSE alternative, which
        leaves its output where the last block left its own, and the rest of the forward."""
        torch.sub(last_output, first_hidden, out=self.remaining)
        self.first_references.copy_(self.first_residual)
        recording.join({REUSE: lambda: torch.add(first_hidden, self.remaining, out=last_output)})


@dataclass
class ForwardPlan:
    """What the first block decided for the blocks after it, within one diffusion-model call."""
    run: CacheRun
    keys: list
    reuse: bool
    # The single-stream layout (text tokens, then image tokens) of the first block's output, copied:
    # ComfyUI's blocks add to their inputs in place, so the first block's output tensors change.
    first_hidden: torch.Tensor
    # While the call is captured in CUDA graphs: the recording and its residuals (the graphs decide).
    recorded: Optional[tuple[Recording, CapturedResiduals]] = None


def conditioning_keys(transformer_options, batch_size) -> list[Hashable]:
    """One key per conditioning in the batch (ComfyUI's cond uuids), so each is cached on its own."""
    keys = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond")
    if not keys or batch_size % len(keys) != 0:
        return ["batch"]
    return list(keys)


class CacheBlock:
    """A `patches_replace["dit"]` entry for one FLUX block under First Block Cache."""

    def __init__(self, previous_replacement=None):
        # Another pack's replacement for this block stays in charge of running it.
        while isinstance(previous_replacement, CacheBlock):
            previous_replacement = previous_replacement.previous_replacement
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


class FirstBlock(CacheBlock):
    def __call__(self, args, extra):
        options = args["transformer_options"]
        run: Optional[CacheRun] = options.get(RUN_KEY)
        if run is None:
            return self.run_block(args, extra)
        # The block adds its residual to `img` in place: keep the input to measure the residual.
        block_input = args["img"].clone()
        out = self.run_block(args, extra)
        first_residual = out["img"] - block_input
        keys = conditioning_keys(options, first_residual.shape[0])
        sharded = options.get(flux_layout.SHARDED_FORWARD_KEY)
        reduce_sums = None
        if sharded is not None:
            # This rank holds a share of the image tokens, padded: measure the real ones, summed over ranks.
            first_residual = first_residual[:, :sharded.shard.image_tokens]
            reduce_sums = sharded.sum_across_ranks
        first_hidden = torch.cat((out["txt"], out["img"]), dim=1)
        graph_pass = options.get(flux_layout.GRAPH_PASS_KEY)
        # `options` is forward_orig's own copy: the plan lives exactly as long as this call.
        if isinstance(graph_pass, Recording):
            residuals = CapturedResiduals.record(graph_pass, first_residual, first_hidden, reduce_sums)
            graph_pass.on_replay(residuals.hand_in)
            graph_pass.branch(residuals.choose, COMPUTE, decider=NODE_NAME)
            options[FORWARD_KEY] = ForwardPlan(run, keys, False, first_hidden, (graph_pass, residuals))
            return out
        with host_decision(graph_pass):
            reuse = run.cache.should_reuse(keys, first_residual, reduce_sums)
        if not reuse:
            run.cache.store_first_residual(keys, first_residual)
        options[FORWARD_KEY] = ForwardPlan(run, keys, reuse, first_hidden)
        return out


class MiddleBlock(CacheBlock):
    def __call__(self, args, extra):
        plan: Optional[ForwardPlan] = args["transformer_options"].get(FORWARD_KEY)
        if plan is not None and plan.reuse:
            return {name: args[name] for name in ("img", "txt") if name in args}
        return self.run_block(args, extra)


class LastBlock(CacheBlock):
    def __call__(self, args, extra):
        plan: Optional[ForwardPlan] = args["transformer_options"].get(FORWARD_KEY)
        if plan is None:
            return self.run_block(args, extra)
        if plan.reuse:
            return {"img": plan.first_hidden + plan.run.cache.remaining_residual(plan.keys)}
        out = self.run_block(args, extra)
        if plan.recorded is not None:
            recording, residuals = plan.recorded
            residuals.record_compute_end(recording, out["img"], plan.first_hidden)
        else:
            plan.run.cache.store_remaining_residual(plan.keys, out["img"] - plan.first_hidden)
        return out


def cache_block_replacements(double_blocks, single_blocks, dit_replacements):
    """`patches_replace["dit"]` entries for every block, keeping `dit_replacements` (others') inside."""
    positions = [("double_block", i) for i in range(double_blocks)] + [("single_block", i) for i in range(single_blocks)]
    replacements = {}
    for position in positions:
        if position == positions[0]:
            role = FirstBlock
        elif position == positions[-1]:
            role = LastBlock
        else:
            role = MiddleBlock
        replacements[position] = role(dit_replacements.get(position))
    return replacements


def install_cache_blocks(model_patcher, double_blocks, single_blocks):
    dit_replacements = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for position, replacement in cache_block_replacements(double_blocks, single_blocks, dit_replacements).items():
        model_patcher.set_model_patch_replace(replacement, "dit", *position)


def start_model_evaluation(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    """CALC_COND_BATCH wrapper: one call per sampling-step evaluation, before any block runs."""
    run: Optional[CacheRun] = model_options["transformer_options"].get(RUN_KEY)
    if run is not None:
        sigma = float(timestep.max())
        run.cache.start_step(sigma, reuse_allowed=run.end_sigma <= sigma <= run.start_sigma)
    return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)


def sample_with_fresh_cache(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a new cache for every sampling run, reported and dropped at its end."""
    guider = executor.class_obj
    settings: CacheSettings = guider.model_options["transformer_options"][SETTINGS_KEY]
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    run = CacheRun(
        cache=FirstBlockCache(settings.residual_diff_threshold, settings.max_consecutive_hits),
        start_sigma=model_sampling.percent_to_sigma(settings.start_percent),
        end_sigma=model_sampling.percent_to_sigma(settings.end_percent),
    )
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        report_run(f"First Block Cache (threshold {settings.residual_diff_threshold}): {run.cache.stats.summary()}")


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
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Share of the sampling schedule after which skipping is allowed; the layout forms early, so a later start keeps composition."),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Share of the schedule after which skipping stops; lower keeps the final detail steps fully computed."),
                io.Int.Input(
                    "max_consecutive_hits", default=0, min=0, max=1000,
                    tooltip="Most steps in a row that may reuse the cache before one is computed again (0 = no limit). Lower bounds drift at some cost in speed."),
            ],
            outputs=[io.Model.Output(tooltip="The same model, with First Block Cache applied while sampling.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        # Naming inputs here takes them out of ComfyUI's own min/max check, so range them too.
        for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
            if not 0.0 <= value <= 1.0:
                return f"{name} must be between 0 and 1, got {value}."
        if start_percent > end_percent:
            return f"start_percent ({start_percent}) must not be greater than end_percent ({end_percent})."
        return True

    @classmethod
    def execute(cls, model, residual_diff_threshold, start_percent, end_percent, max_consecutive_hits) -> io.NodeOutput:
        diffusion_model = flux_layout.flux_diffusion_model(model, NODE_NAME)
        double_blocks, single_blocks = flux_layout.block_counts(diffusion_model)
        if double_blocks == 0 or single_blocks == 0:
            raise ValueError(f"{NODE_NAME} needs a FLUX with double and single blocks; this one has {double_blocks} and {single_blocks}.")
        patched = model.clone()
        patched.model_options["transformer_options"][SETTINGS_KEY] = CacheSettings(
            residual_diff_threshold, start_percent, end_percent, max_consecutive_hits)
        install_cache_blocks(patched, double_blocks, single_blocks)
        for wrapper_type, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, sample_with_fresh_cache),
                                      (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, start_model_evaluation)):
            set_wrapper(patched, wrapper_type, WRAPPER_KEY, wrapper)
        keep_conds_on_device(patched)
        return io.NodeOutput(patched)


class FirstBlockCacheExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ApplyFirstBlockCache]
