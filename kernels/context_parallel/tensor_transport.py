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


def map_structure(structure, function):
    """`structure` (nested dicts, lists and tuples) with `function` applied to every other value in it."""
    if isinstance(structure, dict):
        return {key: map_structure(value, function) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(map_structure(value, function) for value in structure)
    return function(structure)


def to_slots(structure, tensors: list):
    """`structure` with every tensor replaced by a slot; the tensors are appended to `tensors` in order."""
    def slot(value):
        if not isinstance(value, torch.Tensor):
            return value
        if _is_wrapper_subclass(value):
            names, context = value.__tensor_flatten__()
            inner = {name: slot(getattr(value, name)) for name in names}
            return SubclassSlot(type(value), context, inner, tuple(value.size()), tuple(value.stride()))
        tensors.append(value.detach())
        return TensorSlot(tuple(value.shape), value.dtype)

    return map_structure(structure, slot)


def from_slots(structure, tensors):
    """The inverse of `to_slots`: `tensors` is an iterator over the received tensors, in order."""
    def rebuild(value):
        if isinstance(value, TensorSlot):
            return next(tensors)
        if isinstance(value, SubclassSlot):
            inner = {name: rebuild(slot) for name, slot in value.inner.items()}
            return value.cls.__tensor_unflatten__(inner, value.context, value.size, value.stride)
        return value

    return map_structure(structure, rebuild)


def tensor_slots(structure) -> list:
    """The TensorSlots of a slotted structure, in the order `from_slots` consumes tensors."""
    slots = []

    def collect(value):
        if isinstance(value, TensorSlot):
            slots.append(value)
        elif isinstance(value, SubclassSlot):
            for inner in value.inner.values():
                collect(inner)
        return value

    map_structure(structure, collect)
    return slots


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
