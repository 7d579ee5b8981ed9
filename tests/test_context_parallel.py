"""Context Parallel through ComfyUI's real ModelPatcher and KSampler: worker processes on the CPU with gloo
(CI), or one per GPU with NCCL where ComfyUI runs on CUDA (the device machines).

Rank 0 is the test process; each extra rank is a worker process the node starts, with the replica of
the model it is sent. Outputs are compared with one process running the same model. On GPUs, tests
that need more ranks than there are GPUs are skipped.
"""
import gc
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from tests.support.flux_fixtures import tiny_flux_patcher
from fluxaccel.nodes.context_parallel import pool as context_parallel_pool
from fluxaccel.nodes.attention import FluxAttentionBackend
from fluxaccel.nodes.compile import CompileFlux
from fluxaccel.nodes.context_parallel.node import ContextParallel
from conftest import COMFYUI_DIR
from fluxaccel.nodes.context_parallel.pool import WORKER_SCRIPT, WorkerFailed, rendezvous_port
from tests.support.ksampler_helpers import (cache_summaries, conditioning, gpu_like_flux, ksample, relative_error,
                                            tiny_lora, with_block_cache, with_cache, with_lora)
from test_fp8_quantize import quantized

# fp32 sums in another order across ranks: far below anything visible, far above a wrong shard.
SAME_AS_ONE_PROCESS = 1e-5
REUSING_THRESHOLD = 0.8
# What a worker may still allocate in the out-of-memory test: far below the wide model's replica.
WORKER_HEADROOM = 32 * 2**20


ON_GPUS = torch.cuda.is_available()


def needs_ranks(count):
    """Skipped where ComfyUI runs on CUDA with fewer GPUs than `count` ranks (CPU ranks are processes)."""
    return pytest.mark.skipif(ON_GPUS and torch.cuda.device_count() < count, reason=f"needs {count} GPUs here")


pytestmark = needs_ranks(2)


def across(model, gpus=2, ulysses_degree=0, ring_degree=1, port=0, cfg_parallel=False, ranks="this machine"):
    return ContextParallel.execute(model, gpus, ulysses_degree, ring_degree, port, cfg_parallel, ranks).result[0]


@pytest.fixture(autouse=True)
def stop_workers_after_each_test():
    yield
    context_parallel_pool.shutdown_pool()


def context_parallel_reports(caplog):
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("Context Parallel")]


@pytest.mark.parametrize("size, text_tokens, gpus", [
    (32, 6, 2),  # 2 token rows, 6 text tokens: equal shares
    (40, 7, 2),  # 3 token rows, 7 text tokens: neither divides, shares are padded and masked
    pytest.param(56, 9, 4, marks=needs_ranks(4)),  # 4 ranks (the tiny FLUX's 4 heads), 7 token rows, 9 text tokens
])
def test_ulysses_gives_the_single_process_output(size, text_tokens, gpus, caplog_info):
    model = tiny_flux_patcher()
    positive = conditioning(tokens=text_tokens, seed=1)
    expected = ksample(model, positive, size=size, steps=4)
    actual = ksample(across(model, gpus), positive, size=size, steps=4)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert context_parallel_reports(caplog_info)[-1] == (
        f"Context Parallel (multi-GPU): {gpus} {'GPUs' if ON_GPUS else 'processes'} (Ulysses {gpus} x ring 1)")


def test_cond_and_uncond_batched_with_cfg():
    model = tiny_flux_patcher()
    positive, negative = conditioning(tokens=6, seed=1), conditioning(tokens=6, seed=2)
    expected = ksample(model, positive, negative, cfg=3.0, size=40, steps=3)
    assert relative_error(ksample(across(model), positive, negative, cfg=3.0, size=40, steps=3), expected) < SAME_AS_ONE_PROCESS


@pytest.mark.parametrize("gpus", [2, pytest.param(4, marks=needs_ranks(4))])
def test_cfg_parallel_splits_cond_and_uncond_between_the_halves(gpus, caplog_info):
    model = tiny_flux_patcher()
    positive, negative = conditioning(tokens=7, seed=1), conditioning(tokens=7, seed=2)
    expected = ksample(model, positive, negative, cfg=3.0, size=40, steps=3)
    actual = ksample(across(model, gpus, cfg_parallel=True), positive, negative, cfg=3.0, size=40, steps=3)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert context_parallel_reports(caplog_info)[-1] == (
        f"Context Parallel (multi-GPU): {gpus} {'GPUs' if ON_GPUS else 'processes'} (Ulysses {gpus // 2} x ring 1, "
        "CFG parallel: the batch split in 3/3 forwards)")


def test_cfg_parallel_with_a_batch_that_does_not_split_runs_it_whole(caplog_info):
    model = tiny_flux_patcher()
    assert relative_error(ksample(across(model, 2, cfg_parallel=True), steps=3), ksample(model, steps=3)) < SAME_AS_ONE_PROCESS
    assert context_parallel_reports(caplog_info)[-1].endswith("CFG parallel: the batch split in 0/3 forwards)")


@needs_ranks(4)
def test_first_block_cache_decides_alike_on_both_halves_under_cfg_parallel(caplog_info):
    model = tiny_flux_patcher()
    positive, negative = conditioning(tokens=7, seed=1), conditioning(tokens=7, seed=2)
    expected = ksample(with_cache(model, REUSING_THRESHOLD), positive, negative, cfg=3.0, size=40, steps=10)
    expected_steps = cache_summaries(caplog_info)[-1]
    assert expected_steps[2] > 0
    actual = ksample(across(with_cache(model, REUSING_THRESHOLD), 4, cfg_parallel=True), positive, negative, cfg=3.0,
                     size=40, steps=10)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert cache_summaries(caplog_info)[-1] == expected_steps
    assert "First Block Cache took the same 10 decisions on every rank" in context_parallel_reports(caplog_info)[-1]


def test_first_block_cache_takes_the_same_decisions_on_every_rank(caplog_info):
    model = tiny_flux_patcher()
    positive = conditioning(tokens=7, seed=1)
    expected = ksample(with_cache(model, REUSING_THRESHOLD), positive, size=40, steps=10)
    [expected_steps] = cache_summaries(caplog_info)
    assert expected_steps[2] > 0, "the threshold must reuse some steps for this test to mean anything"
    for cache_first in (True, False):
        stacked = across(with_cache(model, REUSING_THRESHOLD)) if cache_first else with_cache(across(model), REUSING_THRESHOLD)
        assert relative_error(ksample(stacked, positive, size=40, steps=10), expected) < SAME_AS_ONE_PROCESS
        assert cache_summaries(caplog_info)[-1] == expected_steps
        assert context_parallel_reports(caplog_info)[-1].endswith(
            "First Block Cache took the same 10 decisions on every rank")


@pytest.mark.parametrize("cfg_parallel", [False, pytest.param(True, marks=needs_ranks(4))])
def test_block_cache_predicts_and_decides_alike_on_every_rank(cfg_parallel, caplog_info):
    """Probe blocks ending in a single block, a tail from the double blocks, Taylor order 2 and padded shares."""
    model = tiny_flux_patcher()
    positive, negative = conditioning(tokens=7, seed=1), conditioning(tokens=7, seed=2)

    def cached(stack):
        return with_block_cache(stack, REUSING_THRESHOLD, 2, probe_blocks=3, tail_blocks=1)

    expected = ksample(cached(model), positive, negative, cfg=3.0, size=40, steps=10)
    expected_steps = cache_summaries(caplog_info)[-1]
    assert 0 < expected_steps[2] < 10
    actual = ksample(across(cached(model), 4 if cfg_parallel else 2, cfg_parallel=cfg_parallel), positive, negative,
                     cfg=3.0, size=40, steps=10)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert cache_summaries(caplog_info)[-1] == expected_steps
    assert context_parallel_reports(caplog_info)[-1].endswith("Block Cache took the same 10 decisions on every rank")


@pytest.mark.parametrize("cache_first", [True, False])
def test_a_calibrating_block_cache_decides_alike_on_every_rank_in_every_pass(cache_first, caplog_info):
    """A quality target samples several cache runs in one sampling run (the calibration's passes), on the
    trained tiny FLUX where they reuse steps: each pass starts a fresh mirrored cache on the workers, in
    either order of the nodes."""
    from bench.fidelity import caches as fidelity
    from fluxaccel.nodes.first_block_cache import forget_calibrations

    shapes = fidelity.load_shapes_model()
    condition = fidelity.spread_conditions(1)[0]
    forget_calibrations()
    expected = fidelity.ksample(with_block_cache(shapes.patcher, 0.0, 1, quality="balanced (44 dB)"), condition, 3,
                                shapes.world, steps=12)
    expected_report = cache_summaries(caplog_info)[-1]
    assert expected_report[2] > 0, "the calibrated threshold reuses steps"
    forget_calibrations()
    stacked = (across(with_block_cache(shapes.patcher, 0.0, 1, quality="balanced (44 dB)")) if cache_first else
               with_block_cache(across(shapes.patcher), 0.0, 1, quality="balanced (44 dB)"))
    actual = fidelity.ksample(stacked, condition, 3, shapes.world, steps=12)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert cache_summaries(caplog_info)[-1] == expected_report
    assert context_parallel_reports(caplog_info)[-1].endswith("Block Cache took the same 12 decisions on every rank")


def test_workers_stay_for_the_next_prompt_and_take_a_new_lora():
    model = tiny_flux_patcher()
    lora = tiny_lora(model)
    parallel = across(model)
    ksample(parallel, steps=2)
    workers = list(context_parallel_pool.active_pool().processes)
    for strength in (0.5, 1.0):
        expected = ksample(with_lora(model, lora, strength), steps=3)
        assert relative_error(ksample(with_lora(parallel, lora, strength), steps=3), expected) < SAME_AS_ONE_PROCESS
    assert context_parallel_pool.active_pool().processes == workers


def test_the_workers_keep_their_replica_from_one_prompt_to_the_next(monkeypatch):
    """Every sampling run loads its own clone of the model, and ComfyUI detaches the previous clone
    without unloading the weights: the workers' replica stays (FLUX.1-dev's is 24 GB). Other weights
    (a LoRA) send a new one."""
    model = tiny_flux_patcher()
    lora = tiny_lora(model)
    ksample(across(model), steps=1)
    pool = context_parallel_pool.active_pool()
    sent = []
    send = pool.send
    monkeypatch.setattr(pool, "send", lambda message: sent.append(type(message).__name__) or send(message))
    for _ in range(2):
        ksample(across(model), steps=2)
    assert sent.count("ForwardRequest") == 4 and "ReplicaSpec" not in sent
    ksample(with_lora(across(model), lora, 0.5), steps=2)
    assert sent.count("ReplicaSpec") == 1


def test_lora_fp8_compile_attention_and_first_block_cache_carry_over_to_the_workers(caplog_info):
    model = gpu_like_flux()
    lora = tiny_lora(model)
    compiled = CompileFlux.execute(quantized(with_lora(model, lora, 0.7)), "default", "automatic").result[0]
    stack = with_cache(FluxAttentionBackend.execute(compiled, "cudnn").result[0], REUSING_THRESHOLD)
    expected = ksample(stack, steps=6)
    expected_steps = cache_summaries(caplog_info)[-1]
    parallel = across(stack)
    actual = ksample(parallel, steps=6)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert cache_summaries(caplog_info)[-1] == expected_steps
    ksample(parallel, steps=6, seed=1)
    compile_reports = [record.getMessage() for record in caplog_info.records if record.getMessage().startswith("Compile FLUX")]
    assert compile_reports[-1].startswith("Compile FLUX: no graph compiled this run (all shapes seen before)"), \
        "the sharded forward must not recompile from one run (or step) to the next"


def test_a_killed_worker_fails_the_prompt_within_seconds_and_the_next_prompt_works():
    model = tiny_flux_patcher()
    parallel = across(model)
    ksample(parallel, steps=1)
    worker = context_parallel_pool.active_pool().processes[0]
    killed_at = []
    threading.Timer(2.0, lambda: killed_at.append(time.monotonic()) or worker.kill()).start()
    with pytest.raises(WorkerFailed, match=r"worker 1: exited with code -9.*next prompt starts the workers again"):
        ksample(parallel, steps=10_000)
    assert time.monotonic() - killed_at[0] < 10.0
    assert relative_error(ksample(parallel, steps=3), ksample(model, steps=3)) < SAME_AS_ONE_PROCESS


@pytest.mark.skipif(ON_GPUS, reason="on GPUs the test below meets CUDA's own out-of-memory")
def test_out_of_memory_in_a_worker_fails_the_prompt_with_its_error_and_the_next_prompt_works():
    """A real allocation failure: the worker's address space is capped just above what it uses, then it is
    sent the replica of a wider model (fp32, about 200 MB), as a GPU worker would meet CUDA's out-of-memory."""
    ksample(across(tiny_flux_patcher()), steps=1)
    worker = context_parallel_pool.active_pool().processes[0]
    cap = psutil.Process(worker.pid).memory_info().vms + WORKER_HEADROOM
    resource.prlimit(worker.pid, resource.RLIMIT_AS, (cap, cap))
    wide = tiny_flux_patcher(hidden_size=1024, depth=1, depth_single_blocks=1)
    with pytest.raises(WorkerFailed, match=r"worker 1: (MemoryError|RuntimeError: .*can't allocate memory.*) \(out of "
                                           r"memory on this worker's device: .* free memory there, .*next prompt starts"):
        ksample(across(wide), steps=1)
    assert relative_error(ksample(across(wide), steps=2), ksample(wide, steps=2)) < SAME_AS_ONE_PROCESS


@pytest.mark.skipif(not ON_GPUS, reason="needs CUDA GPUs")
def test_out_of_memory_on_a_worker_gpu_fails_the_prompt_with_its_error_and_the_next_prompt_works():
    """CUDA's own out-of-memory in a worker: the test takes nearly all of the worker GPU's free memory, as
    another program would, then the worker is sent the replica of a wider model (fp32, about 200 MB)."""
    ksample(across(tiny_flux_patcher()), steps=1)
    worker_gpu = torch.device(context_parallel_pool.active_pool().layout.devices[1])
    free, _ = torch.cuda.mem_get_info(worker_gpu)
    taken = torch.empty(free - WORKER_HEADROOM, dtype=torch.uint8, device=worker_gpu)
    wide = tiny_flux_patcher(hidden_size=1024, depth=1, depth_single_blocks=1)
    try:
        with pytest.raises(WorkerFailed, match=r"worker 1: OutOfMemoryError: CUDA out of memory.* \(out of memory on "
                                               r"this worker's device: .* free memory there, .*next prompt starts"):
            ksample(across(wide), steps=1)
    finally:
        del taken
        torch.cuda.empty_cache()
    assert relative_error(ksample(across(wide), steps=2), ksample(wide, steps=2)) < SAME_AS_ONE_PROCESS


@pytest.mark.skipif(not ON_GPUS, reason="ring attention needs CUDA GPUs")
@pytest.mark.parametrize("gpus, ulysses_degree, ring_degree", [(2, 1, 2), pytest.param(4, 2, 2, marks=needs_ranks(4))])
def test_ring_attention_gives_the_single_gpu_output(gpus, ulysses_degree, ring_degree, caplog_info):
    model = tiny_flux_patcher()
    positive = conditioning(tokens=8, seed=1)
    expected = ksample(model, positive, size=64, steps=4)
    actual = ksample(across(model, gpus, ulysses_degree, ring_degree), positive, size=64, steps=4)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert context_parallel_reports(caplog_info)[-1] == (
        f"Context Parallel (multi-GPU): {gpus} GPUs (Ulysses {ulysses_degree} x ring {ring_degree})")


@pytest.mark.skipif(not ON_GPUS, reason="ring attention needs CUDA GPUs")
def test_ring_attention_over_shares_that_do_not_divide_gets_a_clear_error():
    with pytest.raises(WorkerFailed, match="ring attention needs the image's 3 token rows and the prompt's 6 tokens "
                                           "to divide by 2 GPUs; change the size or use Ulysses only"):
        ksample(across(tiny_flux_patcher(), 2, 1, 2), size=40, steps=1)


@pytest.mark.skipif(not ON_GPUS, reason="CUDA graphs need CUDA GPUs (over gloo the ranks launch: test_graph_segments.py)")
@pytest.mark.parametrize("gpus, ulysses_degree, ring_degree, cfg_parallel, size", [
    (2, 2, 1, False, 32),
    (2, 2, 1, False, 40),  # shares padded, the key mask filled inside the graphs
    (2, 1, 2, False, 32),
    pytest.param(4, 2, 1, True, 32, marks=needs_ranks(4)),
])
@pytest.mark.parametrize("cache", [None, "First Block Cache", "Block Cache"])
def test_every_rank_replays_its_share_from_cuda_graphs_as_launched(gpus, ulysses_degree, ring_degree, cfg_parallel,
                                                                   size, cache, caplog_info):
    model = gpu_like_flux(dtype=torch.bfloat16)
    cached = cache is not None

    def parallel_stack(cuda_graphs):
        stack = CompileFlux.execute(model, "default", "automatic", cuda_graphs).result[0]
        if cache == "First Block Cache":
            stack = with_cache(stack, REUSING_THRESHOLD)
        elif cache == "Block Cache":
            stack = with_block_cache(stack, REUSING_THRESHOLD, 2, probe_blocks=3, tail_blocks=1)
        return across(stack, gpus, ulysses_degree, ring_degree, cfg_parallel=cfg_parallel)

    positive = conditioning(tokens=8, seed=1)
    expected = ksample(parallel_stack(False), positive, cfg=2.0, size=size, steps=8)
    expected_steps = cache_summaries(caplog_info)[-1] if cached else None
    replaying = parallel_stack(True)
    for _ in range(2):
        assert torch.equal(ksample(replaying, positive, cfg=2.0, size=size, steps=8), expected)
        if cached:
            assert cache_summaries(caplog_info)[-1] == expected_steps
    [*_, report] = [message for record in caplog_info.records if (message := record.getMessage()).startswith("Compile FLUX")]
    assert "; 8 of 8 model calls replayed from CUDA graphs (" in report
    if cached:
        assert f"{cache} decides" in report
        assert context_parallel_reports(caplog_info)[-1].endswith(f"{cache} took the same 8 decisions on every rank")


def test_cancel_stops_every_rank_and_the_next_prompt_works():
    import comfy.model_management

    model = tiny_flux_patcher()
    parallel = across(model)
    ksample(parallel, steps=1)
    threading.Timer(2.0, comfy.model_management.interrupt_current_processing).start()
    started = time.monotonic()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            ksample(parallel, steps=10_000)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert time.monotonic() - started < 10.0
    assert context_parallel_pool.active_pool() is None, "workers left waiting in the cancelled forward are stopped"
    assert relative_error(ksample(parallel, steps=3), ksample(model, steps=3)) < SAME_AS_ONE_PROCESS


@pytest.mark.parametrize("settings, message", [
    ({"gpus": 3}, "Ulysses degree 3 does not divide the model's 4 attention heads; use one of 1, 2, 4"),
    ({"gpus": 4, "ulysses_degree": 2}, "ulysses_degree 2 x ring_degree 1 = 2, but gpus is 4"),
    ({"gpus": 2, "ulysses_degree": 2, "cfg_parallel": True},
     r"2 \(cfg_parallel\) x ulysses_degree 2 x ring_degree 1 = 4, but gpus is 2"),
    pytest.param({"gpus": 2, "ulysses_degree": 1, "ring_degree": 2}, "ring attention needs CUDA GPUs",
                 marks=pytest.mark.skipif(ON_GPUS, reason="ring attention runs on CUDA GPUs")),
])
def test_bad_settings_get_a_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        across(tiny_flux_patcher(), **settings)


@pytest.mark.skipif(not ON_GPUS, reason="a CPU-only ComfyUI runs the ranks as processes, capped by its cores")
def test_more_gpus_than_visible_get_a_clear_error():
    visible = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"{visible + 1} GPUs asked for, {visible} visible to ComfyUI"):
        across(tiny_flux_patcher(), visible + 1, ulysses_degree=1, ring_degree=visible + 1)


@pytest.mark.skipif(ON_GPUS, reason="the limits of CPU processes")
def test_more_cpu_processes_than_cores_get_a_clear_error(monkeypatch):
    """Up to one process per core, or 4 on a smaller machine (CI's 2 cores run the 4-rank tests)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(ValueError, match=r"8 processes asked for on a CPU-only ComfyUI that may use 2 CPU cores; .* "
                                         r"Use gpus 4 or fewer"):
        across(tiny_flux_patcher(), 8, cfg_parallel=True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    across(tiny_flux_patcher(), 8, cfg_parallel=True)


@pytest.mark.skipif(ON_GPUS, reason="the limits of CPU processes")
def test_more_copies_of_the_model_than_memory_holds_get_a_clear_error(monkeypatch):
    model = tiny_flux_patcher()
    size = model.model_size()
    available = size * 3 // 2
    memory = psutil.virtual_memory()._replace(available=available)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    mib = f"{size / 2**20:.1f} MiB"
    with pytest.raises(ValueError, match=f"4 processes need 3 copies of the model besides ComfyUI's \\({mib} each, "
                                         f"{3 * size / 2**20:.1f} MiB\\), but {available / 2**20:.1f} MiB of memory "
                                         r"is available. Use gpus 2 or fewer, or free memory"):
        across(model, 4)
    across(model, 2)


def listening_sockets(pids) -> set:
    return {(connection.pid, connection.laddr.ip, connection.laddr.port)
            for connection in psutil.net_connections(kind="inet")
            if connection.status == psutil.CONN_LISTEN and connection.pid in pids}


def network_interface():
    """A network interface other than loopback, if the machine has one with an IPv4 address."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.family == socket.AF_INET and not address.address.startswith("127.") for address in addresses):
            return name
    return None


@pytest.mark.skipif(ON_GPUS, reason="gloo's sockets (NCCL's follow the same variables)")
def test_ranks_on_this_machine_listen_on_loopback_only(monkeypatch):
    """The process group's rendezvous and gloo's connections stay on loopback while the workers live: nothing
    another machine could reach (the test process's own earlier listeners aside), even where ComfyUI's environment
    points gloo at the network, which ComfyUI's process gets back once the ranks have met."""
    interface = network_interface()
    if interface is not None:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", interface)
    before = listening_sockets({os.getpid()})
    ksample(across(tiny_flux_patcher()), steps=2)
    pids = {os.getpid(), *(process.pid for process in context_parallel_pool.active_pool().processes)}
    opened = listening_sockets(pids) - before
    assert opened, "the ranks' sockets must be seen for this test to mean anything"
    assert {ip for _, ip, _ in opened} <= {"127.0.0.1", "::1"}, opened
    assert os.environ.get("GLOO_SOCKET_IFNAME") == interface
    store_dir = context_parallel_pool.active_pool().store_dir
    assert os.listdir(store_dir) and os.stat(store_dir).st_mode & 0o077 == 0, "the file store's folder is private"
    context_parallel_pool.shutdown_pool()
    assert not os.path.exists(store_dir)


def test_nccl_kept_on_loopback_refuses_ranks_on_other_machines_until_comfyui_restarts(monkeypatch):
    """NCCL binds to the interface of the process's first communicator for good: a pool that needs another one
    gets a message instead of ranks that never meet."""
    monkeypatch.setattr(context_parallel_pool, "_nccl_interface", None)
    loopback = context_parallel_pool.loopback_interface()
    context_parallel_pool.claim_nccl_interface(loopback)
    context_parallel_pool.claim_nccl_interface(loopback)
    with pytest.raises(ValueError, match=r"NCCL in ComfyUI's process was set up for ranks of this machine \(on "
                                         r"loopback\); restart ComfyUI to switch between 'this machine' and "
                                         r"'environment \(multi-machine\)' on GPUs"):
        context_parallel_pool.claim_nccl_interface(None)


def test_a_port_in_use_gets_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} is already in use.*choose another port, or 0"):
            across(tiny_flux_patcher(), port=port)


def test_non_flux_model_gets_a_clear_error():
    model = tiny_flux_patcher()
    model.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="supports FLUX.1 .dev, schnell, Kontext. and FLUX.2 .*diffusion model is Linear"):
        across(model)


def test_too_small_an_image_for_the_ranks_gets_a_clear_error():
    with pytest.raises(WorkerFailed, match="the latent has 1 token rows, fewer than the 2 GPUs sharing them"):
        ksample(across(tiny_flux_patcher()), size=16, steps=1)


def test_unloading_the_model_frees_the_workers_replica():
    import comfy.model_management

    model = tiny_flux_patcher()
    parallel = across(model)
    ksample(parallel, steps=1)
    pool = context_parallel_pool.active_pool()
    assert pool.replica_key is not None
    comfy.model_management.unload_all_models()
    assert pool.replica_key is None, "ComfyUI's unload must reach the workers"
    assert relative_error(ksample(parallel, steps=2), ksample(model, steps=2)) < SAME_AS_ONE_PROCESS


def test_freeing_the_model_frees_the_workers_replica():
    """A model ComfyUI lets go of without unloading it first (its last clone gone from the node cache)."""
    model = tiny_flux_patcher()
    ksample(across(model), steps=1)
    pool = context_parallel_pool.active_pool()
    assert pool.replica_key is not None
    del model
    gc.collect()
    assert pool.replica_key is None, "the workers must not keep a copy of a model that no longer exists"


def free_port_pair():
    """A free port whose next one is free too: the rendezvous port and rank 0's control port."""
    while True:
        port = rendezvous_port(0)
        try:
            rendezvous_port(port + 1)
            return port
        except ValueError:
            continue


def test_ranks_from_the_environment_meet_a_worker_started_by_hand(monkeypatch):
    """Another machine's worker, simulated here: started by hand with torch.distributed's environment."""
    port = free_port_pair()
    environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                   "FLUXACCEL_CP_SECRET": "shared secret of this test"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    worker = subprocess.Popen([sys.executable, WORKER_SCRIPT, "--comfyui", COMFYUI_DIR],
                              env={**os.environ, **environment, "RANK": "1"})
    try:
        model = tiny_flux_patcher()
        parallel = across(model, ranks="environment (multi-machine)")
        assert relative_error(ksample(parallel, size=40, steps=3), ksample(model, size=40, steps=3)) < SAME_AS_ONE_PROCESS
        context_parallel_pool.shutdown_pool()
        assert worker.wait(timeout=30) == 0, "the worker serves one session and exits when ComfyUI stops it"
    finally:
        worker.kill()


def test_ranks_from_an_incomplete_environment_get_a_clear_error(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "FLUXACCEL_CP_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="need MASTER_ADDR, MASTER_PORT, WORLD_SIZE, FLUXACCEL_CP_SECRET set"):
        across(tiny_flux_patcher(), ranks="environment (multi-machine)")


@pytest.mark.parametrize("name, value, message", [
    ("WORLD_SIZE", "two", "WORLD_SIZE must be an integer of 1 or more, not 'two'"),
    ("MASTER_PORT", "29500x", r"MASTER_PORT must be an integer from 1 to 65534 \(MASTER_PORT \+ 1 is rank 0's control "
                              r"port\), not '29500x'"),
    ("MASTER_PORT", "65535", "MASTER_PORT must be an integer from 1 to 65534 .*, not '65535'"),
    ("RANK", "zero", "ComfyUI must be rank 0, but RANK is 'zero'"),
])
def test_ranks_from_an_environment_with_a_bad_number_get_a_clear_error(monkeypatch, name, value, message):
    environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2",
                   "FLUXACCEL_CP_SECRET": "shared secret of this test", "RANK": "0", name: value}
    for variable, setting in environment.items():
        monkeypatch.setenv(variable, setting)
    with pytest.raises(ValueError, match=message):
        across(tiny_flux_patcher(), ranks="environment (multi-machine)")


@pytest.mark.parametrize("name, value, message", [
    ("RANK", "one", r"RANK must be an integer of 1 or more \(ComfyUI is rank 0\), not 'one'"),
    ("RANK", "0", r"RANK must be an integer of 1 or more \(ComfyUI is rank 0\), not '0'"),
    ("MASTER_PORT", "port", r"MASTER_PORT must be an integer from 1 to 65534 \(MASTER_PORT \+ 1 is rank 0's control "
                            r"port\), not 'port'"),
    ("LOCAL_RANK", "gpu0", "LOCAL_RANK must be an integer of 0 or more, not 'gpu0'"),
    ("FLUXACCEL_CP_SECRET", "", "FLUXACCEL_CP_SECRET is not set"),
])
def test_a_worker_started_by_hand_with_a_bad_environment_says_which_variable(name, value, message):
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "1",
                   "FLUXACCEL_CP_SECRET": "shared secret of this test", name: value}
    worker = subprocess.run([sys.executable, WORKER_SCRIPT, "--comfyui", COMFYUI_DIR], env=environment,
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 1
    assert re.search(f"nodes/context_parallel/worker.py: {message}", worker.stderr), worker.stderr
