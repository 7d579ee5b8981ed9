"""What every rank of Context Parallel runs: the sharded FLUX forward, and the worker processes' loop.

One forward on every rank (ComfyUI's process is rank 0, each extra GPU has a worker process):
- the latent's token rows are split across ranks and each rank runs FLUX on its rows, so ComfyUI's
  own `_forward` patchifies, embeds and unpatchifies its share;
- a `patches["post_input"]` hook (run after the embedders) takes this rank's share of the text
  tokens and of the reference images' tokens (FLUX Kontext), pads the shares to the common lengths,
  and gives the image tokens their positions in the whole image, so each rank's RoPE comes from its
  own tokens' ids;
- an `optimized_attention_override` runs attention across ranks (Ulysses, ring), with ComfyUI's
  own attention function on each rank's heads;
- the ranks' output rows are all-gathered into the whole prediction.
Workers build their replica from the weights rank 0 broadcasts (LoRA merged, FP8 as quantized),
then mirror the pack's per-model behaviours: Compile FLUX compiles their blocks, First Block Cache
installs its blocks and follows rank 0's steps, deciding on distances summed across ranks.
Under Compile FLUX's CUDA graphs each rank captures and replays its whole part of a forward (the
collectives and First Block Cache's distance sum inside the graphs) as rank 0 orders with each
forward, so every rank replays the same graphs in the same order.
"""
import gc
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..kernels.context_parallel import (ParallelDegrees, RankGroups, ShardedForward, all_ranks_agree, batch_share,
                                        gather_batch, gather_rows, make_rank_groups, pad_tokens, parallel_attention,
                                        shard_references, shard_text, splits_batch, token_shard)
from ..kernels.cuda_graphs import CallCounts, CapturedCalls, CudaGraphRecorder, GraphOrder
from ..kernels.residual_cache import CachePolicy, ResidualCache
from ..kernels.regional_compile import raised_recompile_limit
from ..kernels.tensor_transport import bucket_sizes, from_slots, receive_tensors, tensor_slots, unpack
from . import comfy_contract, first_block_cache, flux_layout
from .attention import OVERRIDE_KEY as ATTENTION_OVERRIDE_KEY, AttentionOnBackend
from .compile import compile_backend
from .first_block_cache import CacheLayout, CacheRun, cache_block_replacements

# The per-call transformer_options entries rank 0 passes on: First Block Cache keys its residuals by them.
CALL_OPTION_KEYS = ("cond_or_uncond", "uuids")


# ---- the sharded forward (every rank) ----

def shard_tokens(args):
    """`patches["post_input"]` hook: this rank's text share, image positions in the whole image, and its
    share of the reference images' tokens (FLUX Kontext's: ComfyUI appends all of them to each rank's image
    tokens, with their positions), each share padded."""
    sharded: Optional[ShardedForward] = args["transformer_options"].get(flux_layout.SHARDED_FORWARD_KEY)
    if sharded is None:
        return args
    shard = sharded.shard
    image, image_ids = pad_tokens(args["img"][:, :shard.image_tokens], shard.padded_image_tokens), sharded.image_ids
    if shard.padded_reference_tokens:
        references, reference_ids = (tokens[:, shard.image_tokens:] for tokens in (args["img"], args["img_ids"]))
        image = torch.cat((image, shard_references(references, shard)), 1)
        image_ids = torch.cat((image_ids, shard_references(reference_ids, shard)), 1)
    return {"img": image,
            "txt": shard_text(args["txt"], shard),
            "img_ids": image_ids,
            "txt_ids": shard_text(args["txt_ids"], shard)}


def attention_across_ranks(attention, query, key, value, heads, *args, **kwargs):
    """`optimized_attention_override`: FLUX's attention ([batch, heads, tokens, head_dim]) over all ranks' tokens."""
    options = kwargs.get("transformer_options") or {}
    sharded: Optional[ShardedForward] = options.get(flux_layout.SHARDED_FORWARD_KEY)
    if sharded is None or not kwargs.get("skip_reshape", False):
        raise RuntimeError("Context Parallel met an attention call outside FLUX's sharded blocks")

    def local_attention(q, k, v, attn_mask=None):
        local_kwargs = dict(kwargs, mask=attn_mask, skip_output_reshape=True)
        if sharded.previous_attention is not None:
            return sharded.previous_attention(attention, q, k, v, q.shape[1], *args, **local_kwargs)
        return attention(q, k, v, q.shape[1], *args, **local_kwargs)

    out = parallel_attention(query, key, value, sharded.groups, local_attention,
                             sharded.key_padding_mask(query.dtype, query.device))
    if kwargs.get("skip_output_reshape", False):
        return out
    batch, out_heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, out_heads * head_dim)


def with_sharding_hooks(options, sharded: ShardedForward):
    options = options.copy()
    patches = dict(options.get("patches", {}))
    patches["post_input"] = list(patches.get("post_input", [])) + [shard_tokens]
    options["patches"] = patches
    options[ATTENTION_OVERRIDE_KEY] = attention_across_ranks
    options[flux_layout.SHARDED_FORWARD_KEY] = sharded
    return options


def splits_this_batch(inputs: dict, options, degrees: ParallelDegrees) -> bool:
    conditionings = max((len(options[name]) for name in CALL_OPTION_KEYS if name in options), default=1)
    return splits_batch(inputs["x"].shape[0], conditionings, degrees)


def rank_options(inputs: dict, options, groups: RankGroups):
    """The transformer options this rank's share of a forward sees: under CFG parallel, when the batch
    splits, its batch group's conditionings only."""
    if not splits_this_batch(inputs, options, groups.degrees):
        return options
    parts, index = groups.degrees.batch, groups.batch_index
    options = options.copy()
    for name in CALL_OPTION_KEYS:
        if name in options and len(options[name]) > 1:
            options[name] = options[name][index * len(options[name]) // parts:(index + 1) * len(options[name]) // parts]
    return options


def forward_on_rank(run, diffusion_model, inputs: dict, options, groups: RankGroups):
    """This rank's part of one FLUX forward; returns the whole prediction.

    `inputs` holds the forward's whole inputs by name (comfy_contract.forward_inputs);
    `run(inputs, options)` runs the diffusion model on a share of them.
    """
    if not splits_this_batch(inputs, options, groups.degrees):
        return forward_rows_on_rank(run, diffusion_model, inputs, options, groups)
    share = forward_rows_on_rank(run, diffusion_model, batch_share(inputs, inputs["x"].shape[0], groups.degrees.batch,
                                                                  groups.batch_index),
                                 rank_options(inputs, options, groups), groups)
    return gather_batch(share, groups.batch)


def run_forward_order(order: GraphOrder, graph_calls: CapturedCalls, run, diffusion_model, inputs: dict, options,
                      groups: RankGroups, device, counts: CallCounts):
    """This rank's part of one forward as `order` says: launched, captured in CUDA graphs, or replayed;
    (the whole prediction, why the capture failed or None). Every rank runs the same order."""
    def forward(graph_pass, whole):
        return forward_on_rank(run, diffusion_model, whole, flux_layout.with_graph_pass(options, graph_pass), groups)

    return graph_calls.run(order, forward, (inputs,), {}, rank_options(inputs, options, groups), counts,
                           all_ranks_agree(groups.world, device))


def forward_rows_on_rank(run, diffusion_model, inputs: dict, options, groups: RankGroups):
    """The forward shared by this rank's sequence group: each rank runs a band of the latent's rows."""
    x = inputs["x"]
    patch = diffusion_model.patch_size
    height, width = x.shape[-2:]
    x = comfy_contract.pad_to_patch_size(x, patch)
    token_rows, row_tokens = x.shape[-2] // patch, x.shape[-1] // patch
    ranks = groups.degrees.sequence_size
    text_tokens = inputs["context"].shape[1]
    reference_tokens = sum(-(-reference.shape[-2] // patch) * -(-reference.shape[-1] // patch)
                           for reference in inputs.get("ref_latents") or ())
    if token_rows < ranks:
        raise ValueError(f"the latent has {token_rows} token rows, fewer than the {ranks} GPUs sharing them; "
                         "use a larger image or fewer GPUs.")
    shard = token_shard(groups.sequence_rank, ranks, token_rows, row_tokens, text_tokens, reference_tokens)
    if shard.padded and groups.degrees.ring > 1:
        references = f", the reference images' {reference_tokens} tokens" if reference_tokens else ""
        raise ValueError(f"ring attention needs the image's {token_rows} token rows, the prompt's {text_tokens} "
                         f"tokens{references} to divide by {ranks} GPUs; change the size or use Ulysses only "
                         "(ring degree 1).")
    _, image_ids = diffusion_model.process_img(x, transformer_options=options)
    start, end = shard.image_token_range()
    sharded = ShardedForward(groups, shard, pad_tokens(image_ids[:, start:end], shard.padded_image_tokens),
                             options.get(ATTENTION_OVERRIDE_KEY))
    row_start, row_count = shard.rows
    rows = run({**inputs, "x": x[:, :, row_start * patch:(row_start + row_count) * patch]},
               with_sharding_hooks(options, sharded))
    return gather_rows(rows, shard, patch, groups.sequence)[:, :, :height, :width]


# FLUX Kontext's placements of reference images whose token positions do not depend on the image's size,
# so that each rank's forward, which sees a band of the image's rows, gives them their places in the whole.
SHARDABLE_REFERENCE_METHODS = ("offset", "index")


def unsupported_inputs(diffusion_model, inputs: dict) -> Optional[str]:
    if inputs.get("control") is not None:
        return "ControlNet is not supported yet"
    if inputs.get("attention_mask") is not None:
        return "a text attention mask is not supported yet"
    if inputs.get("ref_latents") is not None:
        method = inputs.get("ref_latents_method", comfy_contract.default_reference_method(diffusion_model))
        if method not in SHARDABLE_REFERENCE_METHODS:
            return (f"reference latents placed by the '{method}' method are not supported "
                    f"(only {' and '.join(SHARDABLE_REFERENCE_METHODS)}, FLUX.1 Kontext's and FLUX.2's defaults)")
    return None


# ---- messages from rank 0 to the workers ----

@dataclass
class ReplicaSpec:
    """How a worker builds the same diffusion model as rank 0's, loaded and patched."""
    model_config_class: type
    unet_config: dict
    manual_cast_dtype: Optional[torch.dtype]
    optimizations: dict
    parameters: dict  # name -> slot, bytes sent after the spec
    buffers: dict
    compile_settings: Optional[tuple]  # (mode, dynamic_shapes) of Compile FLUX
    block_cache: Optional[CacheLayout]  # First Block Cache's or Block Cache's probe and tail blocks
    attention_backend: Optional[str]  # FLUX Attention Backend's choice


@dataclass
class CacheStep:
    """Rank 0's cache state (First Block Cache or Block Cache) at a forward, for the workers to mirror."""
    run_serial: int  # the cache run's (a Block Cache calibration samples several runs in one sampling)
    steps_started: int
    sigma: Optional[float]
    reuse_allowed: bool
    policy: CachePolicy


@dataclass
class ForwardRequest:
    inputs: dict  # the forward's slotted inputs by name (comfy_contract.forward_inputs); bytes sent after the request
    call_options: dict
    cache_step: Optional[CacheStep]
    graph_order: GraphOrder  # rank 0's decision on the forward's CUDA graphs, for every rank


@dataclass
class DropReplica:
    pass


@dataclass
class DeviceMemory:
    """Asks each worker for (bytes allocated, peak bytes allocated) on its GPU; `reset` starts a new peak."""
    reset: bool = False


@dataclass
class CacheDecisions:
    """Asks each worker for its First Block Cache's decisions in the run: answered over its connection."""
    pass


@dataclass
class Stop:
    pass


# ---- the worker side ----

def receiver(connection, backend, device):
    """Receives the tensors rank 0 sends after a message (see RankPool.send_tensors), given their slots."""
    def receive(slots: list) -> list:
        if backend == "gloo":
            return unpack(slots, (torch.frombuffer(bytearray(connection.recv_bytes()), dtype=torch.uint8)
                                  for _ in bucket_sizes(slots)))
        return receive_tensors(slots, device)
    return receive


def build_replica(spec: ReplicaSpec, device, receive):
    """The diffusion model of `spec` on `device`, its weights received from rank 0."""
    model_config = spec.model_config_class(dict(spec.unet_config))
    model_config.set_inference_dtype(spec.unet_config.get("dtype"), spec.manual_cast_dtype)
    model_config.optimizations = dict(spec.optimizations)
    diffusion_model = model_config.get_model({}, "", device=torch.device("meta")).diffusion_model
    received = iter(receive(tensor_slots([spec.parameters, spec.buffers])))
    parameters, buffers = from_slots([spec.parameters, spec.buffers], received)
    for name, tensor in parameters.items():
        comfy_contract.set_parameter(diffusion_model, name, tensor)
    for name, tensor in buffers.items():
        comfy_contract.set_buffer(diffusion_model, name, tensor)
    if spec.compile_settings is not None:
        backend = compile_backend(*spec.compile_settings)
        for block in list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks):
            block.compile(backend=backend, dynamic=backend.dynamic)
    return diffusion_model


class MirroredCache:
    """A worker's First Block Cache, started and stepped as rank 0's."""

    def __init__(self):
        self.run: Optional[CacheRun] = None
        self.run_serial = None

    def options(self, step: Optional[CacheStep]) -> dict:
        if step is None:
            self.run = None
            return {}
        if self.run is None or self.run_serial != step.run_serial:
            cache = ResidualCache(step.policy)
            self.run, self.run_serial = CacheRun(cache, start_sigma=float("inf"), end_sigma=0.0), step.run_serial
        if self.run.cache.steps_started != step.steps_started:
            self.run.cache.start_step(step.sigma, step.reuse_allowed)
            self.run.cache.steps_started = step.steps_started
        return {first_block_cache.RUN_KEY: self.run}


def device_memory(device, reset) -> tuple:
    if device.type != "cuda":
        return 0, 0
    answer = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return answer


def cache_decisions(run: Optional[CacheRun]) -> Optional[tuple]:
    """(steps computed, steps reused, the distances measured) of a First Block Cache run."""
    if run is None:
        return None
    return run.cache.stats.computed_steps, run.cache.stats.reused_steps, list(run.cache.distances)


@dataclass
class Replica:
    diffusion_model: torch.nn.Module
    options: dict  # the replica's own transformer_options (First Block Cache's blocks, the attention backend)
    # The forwards this worker captured for this replica, numbered by rank 0's orders.
    graph_calls: CapturedCalls


def make_replica(spec: ReplicaSpec, device, receive) -> Replica:
    diffusion_model = build_replica(spec, device, receive)
    options = {}
    if spec.block_cache is not None:
        replacements = cache_block_replacements(*flux_layout.block_counts(diffusion_model), spec.block_cache, {})
        options["patches_replace"] = {"dit": replacements}
    if spec.attention_backend is not None:
        options[ATTENTION_OVERRIDE_KEY] = AttentionOnBackend(spec.attention_backend)
    return Replica(diffusion_model, options, CapturedCalls(CudaGraphRecorder()))


def serve_forward(replica: Replica, request: ForwardRequest, mirror: MirroredCache, receive, groups: RankGroups, device):
    inputs = from_slots(request.inputs, iter(receive(tensor_slots(request.inputs))))
    options = {**replica.options, **request.call_options, **mirror.options(request.cache_step)}

    def run_share(share, share_options):
        share_args, share_kwargs = comfy_contract.forward_call(replica.diffusion_model, share, share_options)
        return replica.diffusion_model(*share_args, **share_kwargs)

    with torch.inference_mode(), raised_recompile_limit():
        run_forward_order(request.graph_order, replica.graph_calls, run_share, replica.diffusion_model, inputs, options,
                          groups, device, CallCounts())


def serve(connection, device, groups: RankGroups, backend):
    """A worker's loop: replicas and forwards as rank 0 asks, until told to stop."""
    replica, mirror, receive = None, MirroredCache(), receiver(connection, backend, device)
    while True:
        message = connection.recv()
        if isinstance(message, Stop):
            return
        if isinstance(message, (ReplicaSpec, DropReplica)):
            replica = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if isinstance(message, ReplicaSpec):
            replica = make_replica(message, device, receive)
        elif isinstance(message, ForwardRequest):
            serve_forward(replica, message, mirror, receive, groups, device)
        elif isinstance(message, CacheDecisions):
            connection.send(cache_decisions(mirror.run))
        elif isinstance(message, DeviceMemory):
            connection.send(device_memory(device, message.reset))


def worker_main(connection, setup: dict):
    """Entry of a worker process (see context_parallel_worker.py): joins the world and serves it.

    Any failure is reported to rank 0 over `connection` and ends the process, which breaks the
    ranks' collectives so rank 0 fails the prompt instead of waiting.
    """
    try:
        # A worker started elsewhere uses its LOCAL_RANK's GPU (torch.distributed's convention).
        device = torch.device(setup["device"] or f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        connection.send("ready")
        dist.init_process_group(setup["backend"], init_method=setup["init_method"], rank=setup["rank"],
                                world_size=setup["world_size"], timeout=setup["timeout"],
                                **({"device_id": device} if device.type == "cuda" else {}))
        groups = make_rank_groups(ParallelDegrees(*setup["degrees"]))
        serve(connection, device, groups, setup["backend"])
        dist.destroy_process_group()
    except BaseException as error:
        logging.exception("Context Parallel worker %s failed", setup.get("rank"))
        connection.send(("failed", failure_summary(error), traceback.format_exc()))
        raise


def failure_summary(error: BaseException) -> str:
    """What rank 0 tells the user of a worker's failure; for running out of memory, also what to do."""
    summary = f"{type(error).__name__}: {error}".rstrip(": ")
    if is_out_of_memory(error):
        summary += (" (out of memory on this worker's device: its copy of the model and its share of each forward "
                    "did not fit; free memory there, use FP8 Dynamic Quantize before this node, or a smaller image)")
    return summary


def is_out_of_memory(error: BaseException) -> bool:
    # CPU tensors that do not fit raise RuntimeError from torch's allocator, not MemoryError.
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
