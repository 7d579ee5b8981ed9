"""kernels.context_parallel.tensor_transport: nested structures of tensors, FP8 QuantizedTensors among them, sent rank 0 to rank 1."""
import os
import subprocess
import sys
import textwrap

import torch

from conftest import PACK_DIR
from fluxaccel.kernels.context_parallel.tensor_transport import from_slots, pack, tensor_slots, to_slots, unpack
from fluxaccel.nodes.fp8_layout import quantize_weight


def odd_tensors():
    """Sizes that are no multiple of any alignment, dtypes of every width, a 0-d tensor and a view."""
    generator = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "fp8": torch.randn(7, generator=generator).to(torch.float8_e4m3fn),
        "index": torch.tensor(11),
        "mask": torch.tensor([True, False, True]),
        "columns": torch.randn(4, 6, generator=generator)[:, 1:4],
        "nested": [torch.arange(5, dtype=torch.int16), (None, 2.5, "text")],
    }


def as_bytes(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def same(actual, expected):
    """Equal structure, and tensors of the same dtype, shape and bytes."""
    if isinstance(expected, torch.Tensor):
        return (actual.dtype == expected.dtype and actual.shape == expected.shape
                and torch.equal(as_bytes(actual), as_bytes(expected)))
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(same(actual[k], expected[k]) for k in expected)
    if isinstance(expected, (list, tuple)):
        return type(actual) is type(expected) and all(same(a, e) for a, e in zip(actual, expected))
    return actual == expected


def round_trip(structure):
    tensors = []
    slots = to_slots(structure, tensors)
    return from_slots(slots, iter(unpack(tensor_slots(slots), pack(tensors, "cpu"))))


def test_packed_buckets_give_back_every_tensor_bit_for_bit():
    structure = odd_tensors()
    assert same(round_trip(structure), structure)


def test_an_fp8_quantized_tensor_travels_as_its_parts_and_dequantizes_alike():
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    quantized = quantize_weight(weight, torch.float32, "row")
    received = round_trip({"layer.weight": quantized})["layer.weight"]
    assert type(received) is type(quantized)
    assert torch.equal(received.dequantize(), quantized.dequantize())


def test_broadcast_between_two_processes_over_gloo(tmp_path):
    """The GPU path (process-group broadcast in buckets), run by two CPU processes with gloo."""
    script = tmp_path / "transport.py"
    transport_file = os.path.join(PACK_DIR, "kernels", "context_parallel", "tensor_transport.py")
    script.write_text(textwrap.dedent(f"""
        import datetime, importlib.util, os, sys
        import torch, torch.distributed as dist
        spec = importlib.util.spec_from_file_location("transport", {transport_file!r})
        transport = importlib.util.module_from_spec(spec); spec.loader.exec_module(transport)
        transport.BUCKET_BYTES = 64  # several buckets even for these small tensors
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        generator = torch.Generator().manual_seed(3)
        expected = [torch.randn(13, generator=generator).to(torch.bfloat16), torch.arange(31, dtype=torch.int64),
                    torch.randn(5, 3, generator=generator)]
        if rank == 0:
            transport.send_tensors(expected, "cpu")
        else:
            slots = [transport.TensorSlot(tuple(t.shape), t.dtype) for t in expected]
            received = transport.receive_tensors(slots, "cpu")
            assert all(torch.equal(r, e) for r, e in zip(received, expected)), received
            print("received", len(received))
        dist.destroy_process_group()
    """))
    from fluxaccel.nodes.context_parallel.pool import rendezvous_port

    port = str(rendezvous_port(0))
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert "received 3" in outputs[1]
