"""Sending nested structures of tensors (inputs of a forward, a model's weights) from rank 0 to every rank.

The structure goes by any pickling channel with the tensors replaced by slots (shape, dtype; a
tensor subclass such as an FP8 QuantizedTensor by its `__tensor_flatten__` parts); the tensor bytes
go by torch.distributed broadcasts, GPU to GPU under NCCL, packed in buckets so a model's thousand
weights take a few collectives rather than a thousand.
"""
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 * 1024 * 1024
# Each tensor starts at a multiple of this in its bucket, so its bytes can be viewed as any dtype.
ALIGNMENT = 16


@dataclass(frozen=True)
class TensorSlot:
    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class SubclassSlot:
    """A wrapper tensor subclass, rebuilt with `__tensor_unflatten__` from its inner tensors."""
    cls: type
    context: Any
    inner: dict
    size: tuple
    stride: tuple


def _is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(type(tensor), "__tensor_flatten__")


def to_slots(structure, tensors: list):
    """`structure` with every tensor replaced by a slot; the tensors are appended to `tensors` in order."""
    if isinstance(structure, torch.Tensor):
        if _is_wrapper_subclass(structure):
            names, context = structure.__tensor_flatten__()
            inner = {name: to_slots(getattr(structure, name), tensors) for name in names}
            return SubclassSlot(type(structure), context, inner, tuple(structure.size()), tuple(structure.stride()))
        tensors.append(structure.detach())
        return TensorSlot(tuple(structure.shape), structure.dtype)
    if isinstance(structure, dict):
        return {key: to_slots(value, tensors) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(to_slots(value, tensors) for value in structure)
    return structure


def from_slots(structure, tensors):
    """The inverse of `to_slots`: `tensors` is an iterator over the received tensors, in order."""
    if isinstance(structure, TensorSlot):
        return next(tensors)
    if isinstance(structure, SubclassSlot):
        inner = {name: from_slots(slot, tensors) for name, slot in structure.inner.items()}
        return structure.cls.__tensor_unflatten__(inner, structure.context, structure.size, structure.stride)
    if isinstance(structure, dict):
        return {key: from_slots(value, tensors) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(from_slots(value, tensors) for value in structure)
    return structure


def tensor_slots(structure) -> list:
    """The TensorSlots of a slotted structure, in the order `from_slots` consumes tensors."""
    if isinstance(structure, TensorSlot):
        return [structure]
    if isinstance(structure, SubclassSlot):
        return [slot for inner in structure.inner.values() for slot in tensor_slots(inner)]
    if isinstance(structure, dict):
        return [slot for value in structure.values() for slot in tensor_slots(value)]
    if isinstance(structure, (list, tuple)):
        return [slot for value in structure for slot in tensor_slots(value)]
    return []


def _nbytes(slot: TensorSlot) -> int:
    return torch.Size(slot.shape).numel() * slot.dtype.itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _buckets(slots: list) -> list[list[int]]:
    """Indices of consecutive slots grouped into buckets of about BUCKET_BYTES."""
    buckets, current, size = [], [], 0
    for index, slot in enumerate(slots):
        if current and size + _aligned(_nbytes(slot)) > BUCKET_BYTES:
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += _aligned(_nbytes(slot))
    if current:
        buckets.append(current)
    return buckets


def _aligned_bytes(tensor: torch.Tensor, device) -> torch.Tensor:
    data = tensor.to(device).contiguous().reshape(-1).view(torch.uint8)
    return torch.nn.functional.pad(data, (0, _aligned(data.numel()) - data.numel()))


def pack(tensors: list, device) -> Iterator[torch.Tensor]:
    """`tensors` as uint8 buckets on `device`, one at a time."""
    slots = [TensorSlot(tuple(t.shape), t.dtype) for t in tensors]
    for bucket in _buckets(slots):
        yield torch.cat([_aligned_bytes(tensors[i], device) for i in bucket])


def bucket_sizes(slots: list) -> list[int]:
    """Bytes of each bucket `pack` makes of tensors with these slots."""
    return [sum(_aligned(_nbytes(slots[i])) for i in bucket) for bucket in _buckets(slots)]


def unpack(slots: list, buckets: Iterable[torch.Tensor]) -> list:
    """The tensors of `pack`'s buckets, as views of them."""
    tensors = []
    for indices, packed in zip(_buckets(slots), buckets):
        offset = 0
        for i in indices:
            size = _nbytes(slots[i])
            tensors.append(packed[offset:offset + size].view(slots[i].dtype).view(slots[i].shape))
            offset += _aligned(size)
    return tensors


def send_tensors(tensors: list, device) -> None:
    """Rank 0's side of `receive_tensors`: broadcasts `tensors` (as listed by `to_slots`) to the world."""
    for packed in pack(tensors, device):
        dist.broadcast(packed, src=0)


def receive_tensors(slots: list, device) -> list:
    """Receives the tensors rank 0 broadcast with `send_tensors`, as views of the received buckets."""
    def received(size):
        packed = torch.empty(size, dtype=torch.uint8, device=device)
        dist.broadcast(packed, src=0)
        return packed

    return unpack(slots, (received(size) for size in bucket_sizes(slots)))
