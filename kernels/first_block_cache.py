"""First Block Cache: the per-run decision and residual store, in plain torch.

Each model evaluation runs the first transformer block. When its residual (output minus input)
moved little since the last fully computed evaluation, the remaining blocks are skipped and their
cached residual is added instead. Rows of a batch belong to different conditionings (cond/uncond
batched together, or evaluated in separate calls), so residuals are stored per conditioning key;
the reuse decision is taken once per sampling step and shared by every call of that step.
A forward replayed from CUDA graphs measures the distance inside its first graph and hands the sums
to `should_reuse`; the residuals it stores are its own tensors, which the graphs write in place.
"""
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

ReduceSums = Callable[[torch.Tensor], torch.Tensor]


def absolute_difference_sums(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[sum |current - previous|, sum |previous|] in float32, ready to be summed across ranks."""
    current = current.float()
    previous = previous.float()
    return torch.stack(((current - previous).abs().sum(), previous.abs().sum()))


def distance_sums(current: torch.Tensor, previous: torch.Tensor,
                  reduce_sums: Optional[ReduceSums] = None) -> torch.Tensor:
    """`absolute_difference_sums`, summed across ranks by `reduce_sums` when each holds a share of the tokens."""
    sums = absolute_difference_sums(current, previous)
    return sums if reduce_sums is None else reduce_sums(sums)


def relative_l1_distance(sums: torch.Tensor) -> float:
    """Relative mean absolute difference from `absolute_difference_sums` (inf when the reference is 0)."""
    difference, reference = sums.tolist()
    if reference == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / reference


@dataclass
class CacheStats:
    computed_steps: int = 0
    reused_steps: int = 0

    def summary(self) -> str:
        total = self.computed_steps + self.reused_steps
        return f"computed {self.computed_steps}/{total} steps, reused {self.reused_steps}/{total}"


def same_memory(first: torch.Tensor, second: torch.Tensor) -> bool:
    return (first.data_ptr() == second.data_ptr() and first.shape == second.shape
            and first.stride() == second.stride() and first.dtype == second.dtype)


class RowStore:
    """Tensors stored per conditioning key: batch row chunk i of a call belongs to keys[i]."""

    def __init__(self):
        self._rows: dict[Hashable, torch.Tensor] = {}

    def put(self, keys: Sequence[Hashable], batch: torch.Tensor) -> None:
        for key, rows in zip(keys, batch.chunk(len(keys))):
            self._rows[key] = rows

    def has(self, keys: Sequence[Hashable], like: Optional[torch.Tensor] = None) -> bool:
        """Whether every key holds rows, shaped like this call's rows when `like` is given."""
        if like is None:
            return all(key in self._rows for key in keys)
        row_shape = (like.shape[0] // len(keys),) + tuple(like.shape[1:])
        return all(key in self._rows and tuple(self._rows[key].shape) == row_shape for key in keys)

    def get(self, keys: Sequence[Hashable]) -> torch.Tensor:
        return torch.cat([self._rows[key] for key in keys])

    def copy_into(self, keys: Sequence[Hashable], batch: torch.Tensor) -> None:
        """Writes the rows held for keys[i] into chunk i of `batch`, where they have its shape and are
        not those very rows already (stored as views of `batch`)."""
        for key, rows in zip(keys, batch.chunk(len(keys))):
            held = self._rows.get(key)
            if held is not None and held.shape == rows.shape and not same_memory(held, rows):
                rows.copy_(held)

    def clear(self) -> None:
        self._rows.clear()


class FirstBlockCache:
    """State of one sampling run: reference residuals, cached remainders, the step's decision."""

    def __init__(self, residual_diff_threshold: float, max_consecutive_hits: int = 0):
        self.residual_diff_threshold = residual_diff_threshold
        self.max_consecutive_hits = max_consecutive_hits
        self.stats = CacheStats()
        self.distances: list[float] = []
        self._first_residuals = RowStore()
        self._remaining_residuals = RowStore()
        self._consecutive_hits = 0
        self._step_decision: Optional[bool] = None
        # The latest start_step's arguments and how many steps started: what another process
        # mirrors to keep its own cache of the same run in step (context parallel).
        self.last_sigma: Optional[float] = None
        self.reuse_allowed = False
        self.steps_started = 0

    def start_step(self, sigma: float, reuse_allowed: bool) -> None:
        """Called once per model evaluation, before any call of that evaluation runs a block."""
        if self.last_sigma is not None and sigma > self.last_sigma:
            # The schedule restarted (a new pass of noise): residuals of the old pass do not apply.
            self.reset_residuals()
        self.last_sigma = sigma
        self.reuse_allowed = reuse_allowed
        self.steps_started += 1
        self._step_decision = None

    def reset_residuals(self) -> None:
        self._first_residuals.clear()
        self._remaining_residuals.clear()
        self._consecutive_hits = 0

    def should_reuse(self, keys: Sequence[Hashable], first_residual: torch.Tensor,
                     reduce_sums: Optional[ReduceSums] = None, measured_sums: Optional[torch.Tensor] = None) -> bool:
        """Decides, for this call, whether the remaining blocks are skipped.

        The first call of a step decides for the whole step; later calls (uncond after cond, when
        ComfyUI evaluates them separately) follow it when their own residuals are cached.
        `reduce_sums` sums the distance's parts across ranks when each holds a share of the tokens
        (context parallel), so every rank measures the whole residual and decides alike.
        `measured_sums`: those sums already measured on the device against the stored first
        residuals (a replayed CUDA graph did), read only when the decision needs them.
        """
        if self._step_decision is None:
            self._step_decision = self._decide(keys, first_residual, reduce_sums, measured_sums)
            if self._step_decision:
                self.stats.reused_steps += 1
                self._consecutive_hits += 1
            else:
                self.stats.computed_steps += 1
                self._consecutive_hits = 0
        return self._step_decision and self._remaining_residuals.has(keys)

    def _decide(self, keys: Sequence[Hashable], first_residual: torch.Tensor,
                reduce_sums: Optional[ReduceSums], measured_sums: Optional[torch.Tensor]) -> bool:
        if not self.reuse_allowed or self.residual_diff_threshold <= 0.0:
            return False
        if 0 < self.max_consecutive_hits <= self._consecutive_hits:
            return False
        if not (self._first_residuals.has(keys, first_residual) and self._remaining_residuals.has(keys)):
            return False
        if measured_sums is None:
            measured_sums = distance_sums(first_residual, self._first_residuals.get(keys), reduce_sums)
        distance = relative_l1_distance(measured_sums)
        self.distances.append(distance)
        return distance < self.residual_diff_threshold

    def store_first_residual(self, keys: Sequence[Hashable], first_residual: torch.Tensor) -> None:
        self._first_residuals.put(keys, first_residual)

    def store_remaining_residual(self, keys: Sequence[Hashable], remaining_residual: torch.Tensor) -> None:
        self._remaining_residuals.put(keys, remaining_residual)

    def remaining_residual(self, keys: Sequence[Hashable]) -> torch.Tensor:
        return self._remaining_residuals.get(keys)

    def copy_stored_into(self, keys: Sequence[Hashable], first_residuals: torch.Tensor,
                         remaining_residuals: torch.Tensor) -> None:
        """Writes the keys' stored residuals into these tensors (a captured forward's own, which its
        graphs read), where they are not there already: residuals an earlier call stored elsewhere
        (a launched call, or a forward of another shape of batch) are handed over."""
        self._first_residuals.copy_into(keys, first_residuals)
        self._remaining_residuals.copy_into(keys, remaining_residuals)
