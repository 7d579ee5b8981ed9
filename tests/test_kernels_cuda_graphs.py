"""kernels.cuda_graphs: what makes two calls the same call (CPU), and capture and replay (CUDA)."""
import logging

import pytest
import torch

from conftest import needs_cuda
from fluxaccel.kernels.cuda_graphs import CapturedCalls, call_signature, reset_cuda_random_state, weights_signature
from fluxaccel.nodes.fp8_layout import quantize_weight


def test_signature_follows_shapes_and_values_not_tensor_contents():
    base = call_signature((torch.zeros(2, 3), 7), {"mode": "a", "mask": None}, state=("weights",))
    assert base == call_signature((torch.ones(2, 3), 7), {"mode": "a", "mask": None}, state=("weights",))
    different = [
        call_signature((torch.zeros(2, 4), 7), {"mode": "a", "mask": None}, state=("weights",)),
        call_signature((torch.zeros(2, 3, dtype=torch.float64), 7), {"mode": "a", "mask": None}, state=("weights",)),
        call_signature((torch.zeros(2, 3), 8), {"mode": "a", "mask": None}, state=("weights",)),
        call_signature((torch.zeros(2, 3), 7), {"mode": "b", "mask": None}, state=("weights",)),
        call_signature((torch.zeros(2, 3), 7), {"mode": "a", "mask": torch.zeros(1)}, state=("weights",)),
        call_signature((torch.zeros(2, 3), 7), {"mode": "a", "mask": None}, state=("other weights",)),
    ]
    assert all(signature is not None and signature != base for signature in different)
    assert len(set(different)) == len(different)


def test_a_call_with_an_unhashable_value_has_no_signature():
    class Unhashable:
        __hash__ = None

    assert call_signature((torch.zeros(1),), {"options": Unhashable()}, state=()) is None


def test_weights_signature_changes_when_a_weight_is_replaced_not_when_it_is_updated_in_place():
    layer = torch.nn.Linear(4, 4)
    before = weights_signature(layer)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert weights_signature(layer) == before, "a graph reads the new values at the same address"
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    assert weights_signature(layer) != before


def test_weights_signature_looks_inside_fp8_weights():
    layer = torch.nn.Linear(32, 16, bias=False)
    weight = layer.weight.detach().clone()
    layer.weight = torch.nn.Parameter(quantize_weight(weight, torch.float32, "row"), requires_grad=False)
    per_row = weights_signature(layer)
    assert weights_signature(layer) == per_row
    inner_scale = layer.weight._params.scale
    assert any(inner_scale.data_ptr() in identity for identity in nested_tuples(per_row)), "the scale's address is part"
    layer.weight = torch.nn.Parameter(quantize_weight(weight, torch.float32, "tensor"), requires_grad=False)
    assert weights_signature(layer) != per_row


def nested_tuples(items):
    for item in items:
        if isinstance(item, tuple):
            yield item
            yield from nested_tuples(item)


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(64, 128), torch.nn.Linear(128, 32)

    def forward(self, x, scale=1.0):
        return self.second(torch.nn.functional.gelu(self.first(x))) * scale


def replaying(net):
    calls = CapturedCalls("test")
    return calls, lambda x, **kwargs: calls(net, (x,), kwargs, weights_signature(net))


@needs_cuda
def test_replays_give_the_eager_results_for_new_inputs():
    net = SmallNet().cuda()
    calls, run = replaying(net)
    inputs = [torch.randn(8, 64, device="cuda") for _ in range(5)]
    with torch.no_grad():
        results = [run(x) for x in inputs]
        expected = [net(x) for x in inputs]
    assert all(torch.equal(result, want) for result, want in zip(results, expected))
    assert (calls.counts.eager, calls.counts.captured, calls.counts.replayed) == (2, 1, 3)


@needs_cuda
def test_a_new_shape_value_or_weight_set_is_captured_anew():
    net = SmallNet().cuda()
    calls, run = replaying(net)
    with torch.no_grad():
        for _ in range(3):
            run(torch.randn(8, 64, device="cuda"))
        for _ in range(3):
            run(torch.randn(4, 64, device="cuda"))
        for _ in range(3):
            run(torch.randn(4, 64, device="cuda"), scale=2.0)
        net.first.weight = torch.nn.Parameter(net.first.weight * 3)
        x = torch.randn(4, 64, device="cuda")
        results = [run(x, scale=2.0) for _ in range(3)]
        expected = net(x, scale=2.0)
    assert all(torch.equal(result, expected) for result in results)
    assert len(calls.graphs) == 4 and calls.counts.captured == 4 and calls.counts.replayed == 4


@needs_cuda
def test_a_call_that_waits_for_the_host_runs_without_a_graph(caplog):
    calls = CapturedCalls("test")

    def syncing(x):
        return x * x.sum().item()

    x = torch.randn(16, device="cuda")
    with caplog.at_level(logging.WARNING):
        results = [calls(syncing, (x,), {}, ()) for _ in range(4)]
    assert all(torch.equal(result, x * x.sum().item()) for result in results)
    assert not calls.graphs and calls.counts.eager == 4
    assert "cannot be captured in a CUDA graph (it waits for the GPU on the host" in caplog.text
    assert sum("cannot be captured" in record.getMessage() for record in caplog.records) == 1, "said once"
    assert torch.cuda.get_sync_debug_mode() == 0


@needs_cuda
def test_random_numbers_work_again_after_a_failed_capture():
    x = torch.randn(16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError):
        with torch.cuda.graph(graph):
            x.sum().item()
    reset_cuda_random_state()
    torch.cuda.manual_seed(3)
    first = torch.randn(4, device="cuda")
    torch.cuda.manual_seed(3)
    assert torch.equal(torch.randn(4, device="cuda"), first)


@needs_cuda
def test_release_gives_the_graphs_memory_back():
    calls, run = replaying(SmallNet().cuda())
    x = torch.randn(4096, 64, device="cuda")

    def capture_and_release():
        with torch.no_grad():
            for _ in range(3):
                run(x)
        held = torch.cuda.memory_reserved()
        calls.release()
        torch.cuda.empty_cache()
        return held

    capture_and_release()  # the capture stream's cuBLAS workspace stays for the process
    reserved = torch.cuda.memory_reserved()
    assert capture_and_release() > reserved
    assert torch.cuda.memory_reserved() <= reserved
