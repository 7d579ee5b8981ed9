"""Context Parallel (multi-GPU): every FLUX forward of a sampling run shared by several GPUs.

Hook-up, through ComfyUI's extension points:
- an OUTER_SAMPLE wrapper starts the worker processes when first needed (they stay for later
  prompts) and gives the run its context;
- a DIFFUSION_MODEL wrapper sends the workers rank 0's loaded weights when they do not hold them
  yet (LoRA merged, FP8 as quantized), then the forward's inputs, and runs rank 0's share: the
  sharding itself is in sharded_forward.py, shared with the workers;
- an ON_DETACH callback frees the workers' replica when ComfyUI unloads the model, and a finalizer
  when the model itself is freed.
Under Compile FLUX's `cuda_graphs` each forward is replayed from CUDA graphs on every rank, as rank 0
orders with the forward (see sharded_forward.py): Compile FLUX's own replay leaves the call to
this wrapper, which reports through it.
"""
import itertools
import os
import weakref
from typing import Optional

import psutil
import torch
from typing_extensions import override

import comfy.model_management
import comfy.patcher_extension
from comfy_api.latest import ComfyExtension, io

from ...kernels.compile.cuda_graphs import LAUNCH, CallCounts, GraphOrder
from ...kernels.context_parallel.sharding import ParallelDegrees, degrees_problem
from ...kernels.context_parallel.tensor_transport import to_slots
from .. import CATEGORY, comfy_contract, compile as compile_node, first_block_cache, flux_layout
from ..attention import attention_backend
from ..patcher_hooks import non_dynamic_clone, set_callback, set_wrapper
from ..reporting import report_run
from .messages import CALL_OPTION_KEYS, CacheDecisions, CacheStep, ForwardRequest, ReplicaSpec
from .pool import (PoolLayout, RankPool, active_pool, environment_rendezvous_problem, pool_for, rendezvous_port,
                   shutdown_pool)
from .serving import cache_decisions
from .sharded_forward import run_forward_order, splits_this_batch, unsupported_inputs

NODE_NAME = comfy_contract.CONTEXT_PARALLEL
LAYOUT_KEY = "fluxaccel.context_parallel"
RUN_KEY = "fluxaccel.context_parallel.run"
WRAPPER_KEY = "fluxaccel.context_parallel"

# A serial per BaseModel object, so a new model at a freed model's address is not taken for it.
_model_serials = weakref.WeakKeyDictionary()
_next_model_serial = itertools.count()


class ContextParallelRun:
    """One sampling run across the pool's ranks."""

    def __init__(self, pool: RankPool, model_patcher, serial: int):
        self.pool = pool
        self.model_patcher = model_patcher
        self.serial = serial
        # The cache's run on rank 0 (First Block Cache, Block Cache), when the model has one: the workers
        # mirror its steps.
        self.cache_run = None
        self.forwards = 0
        self.batch_split_forwards = 0

    def summary(self) -> str:
        degrees = self.pool.layout.degrees
        text = (f"{NODE_NAME}: {degrees.world_size} {'GPUs' if self.pool.device.type == 'cuda' else 'processes'} "
                f"(Ulysses {degrees.ulysses} x ring {degrees.ring}"
                + (f", CFG parallel: the batch split in {self.batch_split_forwards}/{self.forwards} forwards)"
                   if degrees.batch > 1 else ")"))
        if self.cache_run is None:
            return text
        ours = cache_decisions(self.cache_run)
        if any(theirs != ours for theirs in self.pool.ask(CacheDecisions())):
            raise RuntimeError(f"{NODE_NAME}: {self.cache_run.name} decided differently on the ranks; "
                               "please report this.")
        return text + f"; {self.cache_run.name} took the same {ours[0] + ours[1]} decisions on every rank"

    @staticmethod
    def graph_signature(transformer_options) -> tuple:
        """A forward's CUDA graphs depend on the pool's layout, which its graphs live and die with, not on the run."""
        return ()


def replica_key(model_patcher, model_options) -> tuple:
    """Identifies the weights and per-model behaviours a replica must have."""
    model = model_patcher.model
    if model not in _model_serials:
        _model_serials[model] = next(_next_model_serial)
        # As ComfyUI's own bookkeeping does: when the model itself is freed (its last clone gone,
        # without an unload first), the workers free their copy too.
        weakref.finalize(model, drop_replica_of, _model_serials[model]).atexit = False
    serial = _model_serials[model]
    return (serial, comfy_contract.weight_patches_uuid(model), *mirrored_behaviours(model_options))


def mirrored_behaviours(model_options) -> tuple:
    """What the workers redo on their replica: (Compile FLUX's settings or None, the cache's probe and
    tail blocks or None, FLUX Attention Backend's backend or None), as ReplicaSpec's last fields."""
    compile_backend = model_options.get(compile_node.BACKEND_KEY)
    cache_settings = model_options["transformer_options"].get(first_block_cache.SETTINGS_KEY)
    return (None if compile_backend is None else compile_backend.settings,
            None if cache_settings is None else cache_settings.layout,
            attention_backend(model_options))


def uncompiled_names(named_tensors) -> dict:
    """Tensors by their names in the plain model: during a forward, Compile FLUX's compiled blocks
    stand in for the blocks and add `_orig_mod.` to their names."""
    return {name.replace("_orig_mod.", ""): tensor for name, tensor in named_tensors}


def replica_spec(model_patcher, model_options):
    """(spec, tensors) of rank 0's loaded diffusion model, as the workers rebuild it."""
    model = model_patcher.model
    diffusion_model = model.diffusion_model
    if comfy_contract.loaded_partially(model):
        raise ValueError(f"{NODE_NAME} needs the whole model in the first GPU's memory, but ComfyUI loaded it "
                         "partially (low VRAM). Free VRAM (unload other models) or use a smaller weight dtype.")
    tensors = []
    parameters, buffers = to_slots([uncompiled_names(diffusion_model.named_parameters()),
                                    uncompiled_names(diffusion_model.named_buffers())], tensors)
    config = model.model_config
    spec = ReplicaSpec(type(config), dict(config.unet_config), config.manual_cast_dtype,
                       dict(config.optimizations), parameters, buffers, *mirrored_behaviours(model_options))
    return spec, tensors


def cache_step(transformer_options) -> Optional[CacheStep]:
    run = transformer_options.get(first_block_cache.RUN_KEY)
    if run is None:
        return None
    return CacheStep(run.serial, run.cache.steps_started, run.cache.last_sigma, run.cache.reuse_allowed,
                     run.cache.policy)


def sample_across_ranks(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: the pool (started when needed) and the run's context."""
    guider = executor.class_obj
    pool = pool_for(guider.model_options[LAYOUT_KEY])
    pool.run_serial += 1
    original_options = guider.model_options
    guider.model_options = comfy_contract.model_options_clone(original_options)
    run = ContextParallelRun(pool, guider.model_patcher, pool.run_serial)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        samples = executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
    report_run(run.summary())
    return samples


def forward_across_ranks(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: one forward of a FLUX-family model shared by every rank."""
    diffusion_model = executor.class_obj
    inputs, transformer_options = comfy_contract.forward_inputs(diffusion_model, args, kwargs)
    run: Optional[ContextParallelRun] = transformer_options.get(RUN_KEY)
    if run is None:
        return executor(*args, **kwargs)
    problem = unsupported_inputs(diffusion_model, inputs)
    if problem is not None:
        raise ValueError(f"{NODE_NAME}: {problem}; sample without this node.")
    pool, patcher = run.pool, run.model_patcher
    model_options = patcher.model_options
    run.cache_run = transformer_options.get(first_block_cache.RUN_KEY)
    try:
        key = replica_key(patcher, model_options)
        pool.ensure_replica(key, lambda: replica_spec(patcher, model_options))
        forward_graphs = model_options.get(compile_node.CUDA_GRAPHS_KEY)
        order, signature = graph_order(pool, forward_graphs, diffusion_model, list(inputs.values()), {},
                                       transformer_options)
        tensors = []
        slotted = to_slots(inputs, tensors)
        call_options = {name: transformer_options[name] for name in CALL_OPTION_KEYS if name in transformer_options}
        pool.send(ForwardRequest(slotted, call_options, cache_step(transformer_options), order))
        pool.send_tensors(tensors)

        def run_share(share, options):
            share_args, share_kwargs = comfy_contract.forward_call(diffusion_model, share, options)
            return executor(*share_args, **share_kwargs)

        run.forwards += 1
        run.batch_split_forwards += splits_this_batch(inputs, transformer_options, pool.layout.degrees)
        counts = forward_graphs.counts if forward_graphs is not None else CallCounts()
        result, failure = run_forward_order(order, pool.graphs.calls, run_share, diffusion_model, inputs,
                                            transformer_options, pool.groups, pool.device, counts)
        pool.graphs.planner.settle(signature, order, failure)
        return result
    except comfy.model_management.InterruptProcessingException:
        # Cancel: ComfyUI stops rank 0 inside the forward (it checks at every layer), so the
        # workers wait in this forward's collectives: stop them; the next prompt starts new ones.
        shutdown_pool(graceful=False)
        raise
    except Exception as error:
        raise pool.failure(error) from error


# Compile FLUX's replay leaves the forward to this wrapper, which replays each rank's share itself.
forward_across_ranks.replays_cuda_graphs = True


def graph_order(pool, forward_graphs, diffusion_model, inputs, kwargs, transformer_options) -> tuple[GraphOrder, object]:
    """(what every rank does with this forward's CUDA graphs, the signature rank 0 decided it from).
    Launched without Compile FLUX's `cuda_graphs`, over gloo, or where its replay would refuse the
    call (the reason goes to Compile FLUX's report)."""
    if forward_graphs is None:
        return GraphOrder(LAUNCH), None
    if pool.layout.backend != "nccl":
        forward_graphs.bypass_reason = (f"{NODE_NAME}'s ranks exchange tensors over gloo, which a CUDA graph cannot "
                                        "hold: every rank launches its share")
        return GraphOrder(LAUNCH), None
    signature = forward_graphs.signature(diffusion_model, inputs, kwargs, transformer_options)
    if signature is None:
        return GraphOrder(LAUNCH), None
    return pool.graphs.planner.order(signature), signature


def release_replica(model_patcher, unpatch_all):
    """ON_DETACH callback: ComfyUI unloaded the model, so the workers free their copy too.

    A detach that keeps the weights patched (`unpatch_all` False) is no unload: every sampling run
    loads its own clone of the model, and ComfyUI detaches the previous clone that way, handing the
    loaded weights over. Dropping the replica then re-sent FLUX.1-dev's 24 GB to the workers at every
    prompt. A change of weights (another LoRA strength) still sends a new replica: its key changes."""
    if unpatch_all:
        drop_replica_of(_model_serials.get(model_patcher.model))


def drop_replica_of(model_serial):
    """Has the workers free their copy of the model with this serial, if that is what they hold."""
    pool = active_pool()
    if pool is not None and pool.replica_key is not None and pool.replica_key[0] == model_serial:
        pool.drop_replica()


RANKS_FROM = {
    "this machine": "local",
    "environment (multi-machine)": "env",
}


def pool_layout(gpus, degrees: ParallelDegrees, port, ranks_from) -> PoolLayout:
    """Which device each rank uses: ComfyUI's device first, then the next visible GPUs (CPU processes
    without GPU); with ranks from the environment, the other ranks' machines pick their own."""
    device = comfy.model_management.get_torch_device()
    if device.type != "cuda" and degrees.ring > 1:
        raise ValueError(f"{NODE_NAME}: ring attention needs CUDA GPUs; on this {device.type} ComfyUI use "
                         "ring_degree 1 (Ulysses only).")
    if ranks_from == "env":
        problem = environment_rendezvous_problem(gpus)
        if problem is not None:
            raise ValueError(f"{NODE_NAME}: {problem}")
        return PoolLayout(degrees, (str(device),) + ("",) * (gpus - 1), ("",) * gpus, port, ranks_from)
    if device.type != "cuda":
        return PoolLayout(degrees, ("cpu",) * gpus, ("",) * gpus, port)
    visible = torch.cuda.device_count()
    if gpus > visible:
        raise ValueError(f"{NODE_NAME}: {gpus} GPUs asked for, {visible} visible to ComfyUI. Lower 'gpus' "
                         "(or make more GPUs visible with CUDA_VISIBLE_DEVICES).")
    indices = [device.index or 0] + [i for i in range(visible) if i != (device.index or 0)][:gpus - 1]
    names = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    physical = [names[i] if i < len(names) else str(i) for i in indices]
    return PoolLayout(degrees, tuple(f"cuda:{i}" for i in indices), tuple(physical), port)


# On a CPU-only ComfyUI the node is for trying it out: enough processes for every layout (CFG parallel x Ulysses 2)
# even on a machine of fewer cores.
MIN_CPU_PROCESS_LIMIT = 4


def cpu_cores() -> int:
    """The CPU cores ComfyUI's process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_processes_problem(processes, model_patcher) -> Optional[str]:
    """Why this machine should not run `processes` CPU ranks of this model (None when it can): more processes than
    cores only share them, and each worker holds its own copy of the model in memory."""
    cores = cpu_cores()
    if processes > max(cores, MIN_CPU_PROCESS_LIMIT):
        return (f"{processes} processes asked for on a CPU-only ComfyUI that may use {cores} CPU cores; more processes "
                "than cores only share them, each with its own copy of the model. Use gpus "
                f"{max(cores, MIN_CPU_PROCESS_LIMIT)} or fewer (on a CPU the node is for trying it out).")
    replica = model_patcher.model_size()
    available = psutil.virtual_memory().available + running_workers_memory()
    if (processes - 1) * replica <= available:
        return None
    fitting = 1 + available // max(replica, 1)
    fix = f"Use gpus {fitting} or fewer" if fitting >= 2 else "This machine cannot hold a second copy: use gpus 1"
    copies = (f"1 copy of the model besides ComfyUI's ({memory_size(replica)})" if processes == 2 else
              f"{processes - 1} copies of the model besides ComfyUI's ({memory_size(replica)} each, "
              f"{memory_size((processes - 1) * replica)})")
    return f"{processes} processes need {copies}, but {memory_size(available)} of memory is available. {fix}, or free memory."


def running_workers_memory() -> int:
    """What the running workers hold: it comes back when their replica is replaced or they are stopped."""
    pool, held = active_pool(), 0
    for process in pool.processes if pool is not None else ():
        try:
            held += psutil.Process(process.pid).memory_info().rss
        except psutil.Error:
            pass  # it has ended
    return held


def memory_size(size) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


class ContextParallel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FluxAccelContextParallel",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "Shares every FLUX forward between several GPUs: each takes a band of the image's tokens and "
                "a share of the prompt's, and attention runs across them (Ulysses all-to-all over heads, ring "
                "attention over GPU groups). The output equals one GPU's within rounding. Worker processes "
                "start on the first run (seconds) and stay for later prompts. Put it last in the chain: "
                "LoRA, FP8 Dynamic Quantize, Compile FLUX and the cache nodes carry over to every GPU."),
            inputs=[
                io.Model.Input("model", tooltip=flux_layout.MODEL_INPUT_TOOLTIP),
                io.Int.Input("gpus", default=2, min=1, max=64,
                             tooltip=("How many GPUs share each forward: ComfyUI's GPU and the next ones. "
                                      "On a CPU-only ComfyUI: how many processes (at most one per CPU core, or 4, "
                                      "and as many copies of the model as memory holds). 1 leaves the model as it is.")),
                io.Int.Input("ulysses_degree", default=0, min=0, max=64,
                             tooltip=("GPUs that split the attention heads (all-to-all); must divide the model's "
                                      "heads: FLUX.1's and Chroma's 24 (1, 2, 3, 4, 6, 8, 12, 24), FLUX.2 dev's 48. "
                                      "0: gpus / ring_degree.")),
                io.Int.Input("ring_degree", default=1, min=1, max=64,
                             tooltip=("GPU groups that pass keys and values around a ring; needs CUDA. "
                                      "ulysses_degree x ring_degree must equal gpus.")),
                io.Int.Input("port", default=0, min=0, max=65535, advanced=True,
                             tooltip="Local TCP port where the GPUs' processes meet; 0 picks a free one."),
                io.Boolean.Input("cfg_parallel", default=False,
                                 tooltip=("Split the batch between two halves of the GPUs: cond and uncond at cfg > 1, "
                                          "or the images of a batch. gpus = 2 x ulysses_degree x ring_degree. A batch "
                                          "that does not split (cfg 1, one image) runs whole on both halves.")),
                io.Combo.Input("ranks", options=list(RANKS_FROM), default="this machine", advanced=True,
                               tooltip=("this machine: the node starts a worker process per extra GPU here. "
                                        "environment (multi-machine): torch.distributed's MASTER_ADDR, MASTER_PORT, "
                                        "WORLD_SIZE and FLUXACCEL_CP_SECRET, set for ComfyUI (rank 0) and for "
                                        "workers you start on the other machines with "
                                        "nodes/context_parallel/worker.py; 'port' is then unused.")),
            ],
            outputs=[io.Model.Output(tooltip="The same model; its forwards run across the GPUs while sampling.")],
        )

    @classmethod
    def execute(cls, model, gpus, ulysses_degree, ring_degree, port, cfg_parallel, ranks) -> io.NodeOutput:
        diffusion_model = flux_layout.flux_diffusion_model(model, NODE_NAME, flux_layout.POST_INPUT_CLASSES,
                                                           flux_layout.POST_INPUT_MODELS)
        if gpus == 1:
            report_run(f"{NODE_NAME}: 1 GPU asked for, the model runs as it is.")
            return io.NodeOutput(model)
        batch = 2 if cfg_parallel else 1
        degrees = ParallelDegrees(ulysses_degree or max(1, gpus // (ring_degree * batch)), ring_degree, batch)
        if degrees.world_size != gpus:
            factors = f"{'2 (cfg_parallel) x ' if cfg_parallel else ''}ulysses_degree {degrees.ulysses} x ring_degree {degrees.ring}"
            raise ValueError(f"{NODE_NAME}: {factors} = {degrees.world_size}, but gpus is {gpus}; make the product equal gpus.")
        problem = degrees_problem(degrees, diffusion_model.num_heads)
        if problem is not None:
            raise ValueError(f"{NODE_NAME}: {problem}")
        if ranks not in RANKS_FROM:
            raise ValueError(f"{NODE_NAME}: ranks must be one of {', '.join(RANKS_FROM)}, not '{ranks}'.")
        layout = pool_layout(gpus, degrees, port, RANKS_FROM[ranks])
        if layout.ranks_from == "local" and layout.backend == "gloo":
            problem = cpu_processes_problem(gpus, model)
            if problem is not None:
                raise ValueError(f"{NODE_NAME}: {problem}")
        running = active_pool()
        if layout.ranks_from == "local" and port != 0 and (running is None or running.layout.port != port):
            rendezvous_port(port)
        # Rank 0 sends its loaded weights; DynamicVRAM would stream them per call instead.
        patched = non_dynamic_clone(model, NODE_NAME)
        patched.model_options[LAYOUT_KEY] = layout
        set_wrapper(patched, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sample_across_ranks)
        set_wrapper(patched, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, forward_across_ranks)
        set_callback(patched, comfy.patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, release_replica)
        return io.NodeOutput(patched)


class ContextParallelExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ContextParallel]
