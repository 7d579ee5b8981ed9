"""Context Parallel through ComfyUI's real ModelPatcher and KSampler: worker processes on the CPU with gloo.

Rank 0 is the test process; each extra rank is a worker process the node starts, with the replica of
the model it is sent. Outputs are compared with one process running the same model.
"""
import socket
import threading
import time

import pytest
import torch

from flux_fixtures import tiny_flux_patcher
from fluxaccel.nodes import context_parallel_pool
from fluxaccel.nodes.compile import CompileFlux
from fluxaccel.nodes.context_parallel import ContextParallel
from fluxaccel.nodes.context_parallel_pool import WorkerFailed
from ksampler_helpers import cache_summaries, conditioning, ksample, relative_error, tiny_lora, with_cache, with_lora
from test_compile import gpu_like_flux
from test_fp8_quantize import quantized

# fp32 sums in another order across ranks: far below anything visible, far above a wrong shard.
SAME_AS_ONE_PROCESS = 1e-5
REUSING_THRESHOLD = 0.8


def across(model, gpus=2, ulysses_degree=0, ring_degree=1, port=0):
    return ContextParallel.execute(model, gpus, ulysses_degree, ring_degree, port).result[0]


@pytest.fixture(autouse=True)
def stop_workers_after_each_test():
    yield
    context_parallel_pool.shutdown_pool()


def context_parallel_reports(caplog):
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("Context Parallel")]


@pytest.mark.parametrize("size, text_tokens, gpus", [
    (32, 6, 2),  # 2 token rows, 6 text tokens: equal shares
    (40, 7, 2),  # 3 token rows, 7 text tokens: neither divides, shares are padded and masked
    (56, 9, 4),  # 4 ranks (the tiny FLUX's 4 heads), 7 token rows, 9 text tokens
])
def test_ulysses_gives_the_single_process_output(size, text_tokens, gpus, caplog_info):
    model = tiny_flux_patcher()
    positive = conditioning(tokens=text_tokens, seed=1)
    expected = ksample(model, positive, size=size, steps=4)
    actual = ksample(across(model, gpus), positive, size=size, steps=4)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert context_parallel_reports(caplog_info)[-1] == (
        f"Context Parallel (multi-GPU): {gpus} processes (Ulysses {gpus} x ring 1)")


def test_cond_and_uncond_batched_with_cfg():
    model = tiny_flux_patcher()
    positive, negative = conditioning(tokens=6, seed=1), conditioning(tokens=6, seed=2)
    expected = ksample(model, positive, negative, cfg=3.0, size=40, steps=3)
    assert relative_error(ksample(across(model), positive, negative, cfg=3.0, size=40, steps=3), expected) < SAME_AS_ONE_PROCESS


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


def test_lora_fp8_compile_and_first_block_cache_carry_over_to_the_workers(caplog_info):
    model = gpu_like_flux()
    lora = tiny_lora(model)
    stack = with_cache(CompileFlux.execute(quantized(with_lora(model, lora, 0.7)), "default", "automatic").result[0],
                       REUSING_THRESHOLD)
    expected = ksample(stack, steps=6)
    expected_steps = cache_summaries(caplog_info)[-1]
    actual = ksample(across(stack), steps=6)
    assert relative_error(actual, expected) < SAME_AS_ONE_PROCESS
    assert cache_summaries(caplog_info)[-1] == expected_steps


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


@pytest.mark.parametrize("settings, message", [
    ({"gpus": 3}, "Ulysses degree 3 does not divide the model's 4 attention heads; use one of 1, 2, 4"),
    ({"gpus": 4, "ulysses_degree": 2}, "ulysses_degree 2 x ring_degree 1 = 2, but gpus is 4"),
    ({"gpus": 2, "ulysses_degree": 1, "ring_degree": 2}, "ring attention needs CUDA GPUs"),
])
def test_bad_settings_get_a_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        across(tiny_flux_patcher(), **settings)


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
    with pytest.raises(ValueError, match="supports FLUX.1-dev.*diffusion model is Linear"):
        across(model)


def test_too_small_an_image_for_the_ranks_gets_a_clear_error():
    with pytest.raises(WorkerFailed, match="the latent has 1 token rows, fewer than the 2 GPUs sharing them"):
        ksample(across(tiny_flux_patcher()), size=16, steps=1)
