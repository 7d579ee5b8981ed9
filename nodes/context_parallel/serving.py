"""The worker processes' side of Context Parallel: build the replica, serve rank 0's forwards.

Workers build their replica from the weights rank 0 broadcasts (LoRA merged, FP8 as quantized),
then mirror the pack's per-model behaviours: Compile FLUX compiles their blocks, First Block Cache
installs its blocks and follows rank 0's steps, deciding on distances summed across ranks.
"""
import gc
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ...kernels.compile.cuda_graphs import CallCounts, CapturedCalls, CudaGraphRecorder
from ...kernels.compile.regional_compile import compile_blocks, raised_recompile_limit
from ...kernels.context_parallel.sharding import ParallelDegrees, RankGroups, make_rank_groups
from ...kernels.context_parallel.tensor_transport import bucket_sizes, from_slots, receive_tensors, tensor_slots, unpack
from ...kernels.residual_cache import ResidualCache
from .. import comfy_contract, first_block_cache, flux_layout
from ..attention import OVERRIDE_KEY as ATTENTION_OVERRIDE_KEY, AttentionOnBackend
from ..compile import compile_backend
from ..first_block_cache import CacheRun, cache_block_replacements
from .messages import CacheDecisions, CacheStep, DeviceMemory, DropReplica, ForwardRequest, ReplicaSpec, Stop
from .sharded_forward import run_forward_order


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
        # Compiled as rank 0's blocks are (the same size-generic recompile), and kept in the replica's block
        # lists: only this worker calls them.
        backend = compile_backend(*spec.compile_settings)
        for blocks in (diffusion_model.double_blocks, diffusion_model.single_blocks):
            compiled = compile_blocks(dict(enumerate(blocks)), backend, flux_layout.VARYING_BLOCK_INPUT_DIMS)
            for index, block in compiled.items():
                blocks[index] = block
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
    """Entry of a worker process (see worker.py): joins the world and serves it.

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
