"""kernels.compile.cuda_graphs: what makes two calls the same call, and capture and replay of calls split where
their host code decides: on the CPU with the eager stand-in (graph_stand_in.py), on CUDA graphs where a GPU is."""
import logging

import pytest
import torch

from conftest import needs_cuda
from fluxaccel.kernels.compile.cuda_graphs import (CAPTURE, LAUNCH, MAX_GRAPHS, REPLAY, CallCounts, CapturedCalls,
                                                   CapturePlanner, CudaGraphRecorder, GraphOrder, Recording,
                                                   ReplayedCalls, call_signature, host_decision,
                                                   reset_cuda_random_state, weights_signature)
from fluxaccel.nodes.fp8_layout import quantize_weight
from tests.support.graph_stand_in import TapeRecorder


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


def replaying(net, recorder):
    """(counts, graphs, run): `run(x, **kwargs)` calls `net` through ReplayedCalls."""
    graphs, counts = ReplayedCalls("test", recorder), CallCounts()

    def run(x, **kwargs):
        return graphs(call_signature((x,), kwargs, weights_signature(net)), lambda graph_pass, *a, **k: net(*a, **k),
                      (x,), kwargs, None, counts)
    return counts, graphs, run


def branching_call(graph_pass, x, cache, kept_in_graph_memory=False):
    """A call shaped as First Block Cache's: a head measures, the host decides from the measure whether
    the rest runs ("full") or a kept value is reused ("kept"), a tail follows; the kept value lives in
    `cache`, handed to the recorded tensors before each replay. `kept_in_graph_memory`: the mistake of
    keeping it in the graphs' own memory."""
    head = torch.tanh(x) * 2
    measure = head.abs().sum()
    if isinstance(graph_pass, Recording):
        kept = torch.empty_like(head) if kept_in_graph_memory else graph_pass.kept_tensor("kept", head.shape, head.dtype, head.device)

        def choose(context):
            full = measure.item() > context["limit"]
            cache["kept"] = kept
            return "full" if full else "kept"

        graph_pass.on_replay(lambda context: kept.copy_(cache["kept"]) if cache.get("kept") is not kept else None)
        graph_pass.branch(choose, "full", decider="test")
        body = torch.sin(head) + 1
        kept.copy_(body)
        graph_pass.join({"kept": lambda: body.copy_(kept)})
        return body * 3
    with host_decision(graph_pass):
        full = measure.item() > cache["limit"]
    if full:
        body = torch.sin(head) + 1
        cache["kept"] = body.clone()
    else:
        body = cache["kept"].clone()
    return body * 3


def run_branching(recorder, inputs, limit=20.0, kept_in_graph_memory=False):
    """Results of `branching_call` for `inputs` replayed (after a launched and a captured call), and launched."""
    graphs, counts = ReplayedCalls("test", recorder), CallCounts()
    replayed_cache, launched_cache = {"limit": limit}, {"limit": limit}

    def call(graph_pass, x):
        return branching_call(graph_pass, x, replayed_cache, kept_in_graph_memory)

    replayed = [graphs(call_signature((x,), {}, ()), call, (x,), {}, replayed_cache, counts) for x in inputs]
    launched = [branching_call(None, x, launched_cache) for x in inputs]
    return replayed, launched, counts


def branching_inputs(device="cpu"):
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 8, generator=generator) * scale).to(device) for scale in (1, 0.3, 0.2, 2, 0.1, 0.25, 3, 0.2)]


def test_a_split_call_replays_its_segments_and_the_alternative_the_host_chooses():
    inputs = branching_inputs()
    replayed, launched, counts = run_branching(TapeRecorder(), inputs)
    assert all(torch.equal(got, want) for got, want in zip(replayed, launched))
    assert 1 < len({got.sum().item() for got in replayed}) < len(inputs), "both alternatives taken"
    assert (counts.eager, counts.captured, counts.replayed) == (2, 1, 6)
    assert (counts.segments_captured, counts.segments_replayed, counts.deciders) == (4, 18, {"test"})


def test_a_value_kept_outside_the_recorded_tensors_is_handed_in_before_the_replay():
    """The launched first call keeps its value in a tensor of its own: the replay reuses it only because
    `on_replay` copied it into the graphs' tensor."""
    inputs = branching_inputs()
    inputs = inputs[:1] + [inputs[1] * 0.01] * 3
    replayed, launched, _ = run_branching(TapeRecorder(), inputs)
    assert torch.equal(replayed[-1], launched[-1]) and torch.equal(replayed[-1], launched[0])


def test_a_value_left_in_the_graphs_memory_for_a_later_call_is_lost():
    """In a CUDA graph pool nothing survives from one call to the next; the stand-in makes it so (NaN)."""
    replayed, launched, _ = run_branching(TapeRecorder(), branching_inputs(), kept_in_graph_memory=True)
    assert any(got.isnan().any() for got in replayed) and torch.equal(replayed[0], launched[0])


def test_a_kept_tensor_comes_from_outside_the_recording_whose_capture_is_done_again():
    recorder, handed_out = TapeRecorder(), []

    def call(graph_pass, x):
        kept = graph_pass.kept_tensor("kept", x.shape, x.dtype, x.device)
        handed_out.append(kept)
        kept.copy_(x)
        return x * 2

    CapturedCalls(recorder).capture(call, (torch.ones(3),), {})
    allocated = {tensor.data_ptr() for tape in recorder.tapes for tensor in tape.allocated}
    assert len(handed_out) == 2, "captured again once the kept tensor was known"
    assert handed_out[0].data_ptr() in allocated, "the first capture's stand-in was graph memory"
    assert handed_out[1].data_ptr() not in allocated


class RecordingCall:
    """A call whose recording goes wrong in one of a few ways."""

    def __init__(self, fault):
        self.fault = fault

    def __call__(self, graph_pass, x):
        y = x * 2
        if isinstance(graph_pass, Recording) and self.fault == "branch without join":
            graph_pass.branch(lambda context: "a", "a", decider="test")
        if self.fault == "host read":
            y = y * float(y.sum().item() > 0)
        return y + 1


@pytest.mark.parametrize("fault, message", [
    ("host read", "it waits for the GPU on the host"),
    ("branch without join", "a recorded call branched and its alternatives never joined"),
])
def test_a_call_that_cannot_be_recorded_runs_launched_and_is_said_once(fault, message, caplog):
    graphs, counts, call = ReplayedCalls("test", TapeRecorder()), CallCounts(), RecordingCall(fault)
    x = torch.randn(5)
    with caplog.at_level(logging.WARNING):
        results = [graphs(call_signature((x,), {}, ()), call, (x,), {}, None, counts) for _ in range(4)]
    assert all(torch.equal(result, call(None, x)) for result in results)
    assert not graphs.calls.captured and counts.eager == 4
    [warning] = [record.getMessage() for record in caplog.records if "cannot be captured" in record.getMessage()]
    assert warning.startswith(f"test: this call cannot be captured in a CUDA graph ({message}")


def test_planner_captures_at_the_second_call_and_releases_the_least_recently_used():
    planner, numbers = CapturePlanner("test"), []
    for name in range(MAX_GRAPHS + 1):
        assert planner.order(name) == GraphOrder(LAUNCH)
        order = planner.order(name)
        assert order.action == CAPTURE and order.released == (() if name < MAX_GRAPHS else (numbers[0],))
        planner.settle(name, order, None)
        numbers.append(order.number)
        assert planner.order(name) == GraphOrder(REPLAY, order.number)
    assert len(set(numbers)) == MAX_GRAPHS + 1 and 0 not in planner.numbers


def test_planner_launches_a_call_whose_capture_failed_from_then_on(caplog):
    planner = CapturePlanner("test")
    planner.order("a")
    with caplog.at_level(logging.WARNING):
        planner.settle("a", planner.order("a"), "why")
    assert [planner.order("a") for _ in range(3)] == [GraphOrder(LAUNCH)] * 3
    assert caplog.records[-1].getMessage() == (
        "test: this call cannot be captured in a CUDA graph (why); it runs without one.")


def test_ranks_that_do_not_all_agree_capture_nothing():
    calls, counts = CapturedCalls(TapeRecorder()), CallCounts()
    x = torch.randn(3)
    result, failure = calls.run(GraphOrder(CAPTURE, 0), lambda graph_pass, x: x + 1, (x,), {}, None, counts,
                                agree=lambda ok: False)
    assert torch.equal(result, x + 1) and failure == "another rank's call waits for the GPU on the host"
    assert not calls.captured


def test_released_calls_are_dropped_before_the_order_runs():
    calls, counts = CapturedCalls(TapeRecorder()), CallCounts()
    x = torch.randn(3)
    calls.run(GraphOrder(CAPTURE, 0), lambda graph_pass, x: x + 1, (x,), {}, None, counts)
    assert torch.equal(calls.run(GraphOrder(REPLAY, 0), None, (x * 2,), {}, None, counts)[0], x * 2 + 1)
    calls.run(GraphOrder(LAUNCH, None, released=(0,)), lambda graph_pass, x: x, (x,), {}, None, counts)
    assert not calls.captured


@needs_cuda
def test_replays_give_the_eager_results_for_new_inputs():
    net = SmallNet().cuda()
    counts, _, run = replaying(net, CudaGraphRecorder())
    inputs = [torch.randn(8, 64, device="cuda") for _ in range(5)]
    with torch.no_grad():
        results = [run(x) for x in inputs]
        expected = [net(x) for x in inputs]
    assert all(torch.equal(result, want) for result, want in zip(results, expected))
    assert (counts.eager, counts.captured, counts.replayed) == (2, 1, 3)


@needs_cuda
def test_a_split_call_replays_on_cuda_graphs_as_launched():
    replayed, launched, counts = run_branching(CudaGraphRecorder(), branching_inputs("cuda"))
    assert all(torch.equal(got, want) for got, want in zip(replayed, launched))
    assert (counts.captured, counts.replayed, counts.segments_replayed) == (1, 6, 18)


@needs_cuda
def test_a_new_shape_value_or_weight_set_is_captured_anew():
    net = SmallNet().cuda()
    counts, graphs, run = replaying(net, CudaGraphRecorder())
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
    assert len(graphs.calls.captured) == 4 and counts.captured == 4 and counts.replayed == 4


@needs_cuda
@pytest.mark.parametrize("fault", ["host read", "branch without join"])
def test_a_capture_that_fails_part_way_leaves_the_stream_and_random_numbers_working(fault, caplog):
    graphs, counts, call = ReplayedCalls("test", CudaGraphRecorder()), CallCounts(), RecordingCall(fault)
    x = torch.randn(16, device="cuda")
    stream = torch.cuda.current_stream()
    with caplog.at_level(logging.WARNING):
        results = [graphs(call_signature((x,), {}, ()), call, (x,), {}, None, counts) for _ in range(4)]
    assert all(torch.equal(result, call(None, x)) for result in results)
    assert not graphs.calls.captured and counts.eager == 4
    assert sum("cannot be captured" in record.getMessage() for record in caplog.records) == 1, "said once"
    assert torch.cuda.get_sync_debug_mode() == 0 and torch.cuda.current_stream() == stream
    torch.cuda.manual_seed(3)
    first = torch.randn(4, device="cuda")
    torch.cuda.manual_seed(3)
    assert torch.equal(torch.randn(4, device="cuda"), first)


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
    _, graphs, run = replaying(SmallNet().cuda(), CudaGraphRecorder())
    x = torch.randn(4096, 64, device="cuda")

    def capture_and_release():
        with torch.no_grad():
            for _ in range(3):
                run(x)
        held = torch.cuda.memory_reserved()
        graphs.release()
        torch.cuda.empty_cache()
        return held

    capture_and_release()  # the capture stream's cuBLAS workspace stays for the process
    reserved = torch.cuda.memory_reserved()
    assert capture_and_release() > reserved
    assert torch.cuda.memory_reserved() <= reserved
