"""The messages rank 0 sends the worker processes over their control connections, and their answers.

Plain dataclasses, pickled: rank 0 and the workers import the pack under the same name (see worker.py).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ...kernels.compile.cuda_graphs import GraphOrder
from ...kernels.residual_cache import CachePolicy
from ..first_block_cache import CacheLayout

# The per-call transformer_options entries rank 0 passes on: First Block Cache keys its residuals by them.
CALL_OPTION_KEYS = ("cond_or_uncond", "uuids")


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
