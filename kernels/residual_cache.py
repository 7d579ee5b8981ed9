"""The residual cache behind First Block Cache and Block Cache: per sampling run, the decisions and the
stored residuals, in plain torch.

Each model evaluation runs the probe blocks (FLUX's first block, or its first N). When their residual
(output minus input) moved little since the last fully computed evaluation, the blocks after them, up
to the tail blocks that always run, are skipped, and their residual is predicted from the ones stored
at computed steps:
- order 0 (First Block Cache): the last one, as is;
- order 1, 2 (TaylorSeer's idea): a Taylor step from the last one in the schedule's sigma, with
  slope and curvature from divided differences of the last two or three, so uneven schedules are
  followed:  R(s) = R_k + slope * (s - s_k) + curvature * (s - s_k)(s - s_k-1),
  slope = (R_k - R_k-1) / (s_k - s_k-1),  curvature = (slope_k - slope_k-1) / (s_k - s_k-2).
  Slope and curvature are kept in float32; the terms are left out (coefficient 0, state zero) until a
  conditioning has computed enough steps.
Instead of a threshold on the probe's change, `every_n_steps` computes every n-th step of the window
and reuses the ones between (Pruna's FORA schedule), with no read of the GPU.

A quality target (a PSNR against the uncached result) replaces the threshold by one calibrated on the
user's own model and schedule: `calibrated_threshold` bisects the threshold on full sampling runs.

Rows of a batch belong to different conditionings (cond/uncond batched together, or evaluated in
separate calls), so everything is stored per conditioning key; the reuse decision is taken once per
sampling step and shared by every call of that step. A forward replayed from CUDA graphs measures the
distance inside its first graph and hands the sums to `should_reuse`; the residuals it stores are its
own tensors, which the graphs write in place, with the coefficients the host fills in before them.
"""
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import math

import torch

ReduceSums = Callable[[torch.Tensor], torch.Tensor]
# Computed steps a conditioning needs before each Taylor term enters a prediction.
COMPUTES_FOR_SLOPE, COMPUTES_FOR_CURVATURE = 2, 3
# Calibration: thresholds searched in [0, CALIBRATION_HIGHEST], halved this many times (to 1/32 of it).
CALIBRATION_HIGHEST = 0.5
CALIBRATION_HALVINGS = 5


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


def taylor_prediction(residual: torch.Tensor, slope: Optional[torch.Tensor], curvature: Optional[torch.Tensor],
                      coefficients: Optional[torch.Tensor], order: int) -> torch.Tensor:
    """The predicted residual: `residual` itself at order 0, else residual + c1 * slope (+ c2 * curvature
    at order 2) in float32, in the residual's dtype. `coefficients` [2, rows, 1, 1]: c1, c2 per row."""
    if order == 0:
        return residual
    predicted = residual.float() + slope * coefficients[0]
    if order >= 2:
        predicted = predicted + curvature * coefficients[1]
    return predicted.to(residual.dtype)


def taylor_differences(new_residual: torch.Tensor, residual: torch.Tensor, slope: torch.Tensor,
                       factors: torch.Tensor, order: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(slope, curvature or None) after a computed step: divided differences of the new residual with
    the stored residual and slope; `factors` [2, rows, 1, 1] holds 1 / (s_new - s_k) and
    1 / (s_new - s_k-1) per row, 0 where the history is too short."""
    new_slope = (new_residual.float() - residual.float()) * factors[0]
    return new_slope, ((new_slope - slope) * factors[1] if order >= 2 else None)


def latent_psnr(result: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of `result` against `reference`; peak = the reference's dynamic range (max - min).

    Latents have no fixed white level like 8-bit images, so the reference's own range stands in.
    Identical tensors give inf.
    """
    result, reference = result.double(), reference.double()
    mse = torch.mean((result - reference) ** 2).item()
    if mse == 0.0:
        return math.inf
    peak = (reference.max() - reference.min()).item()
    return 10.0 * math.log10(peak ** 2 / mse)


def calibrated_threshold(psnr_at: Callable[[float], float], target_db: float, highest: float = CALIBRATION_HIGHEST,
                         halvings: int = CALIBRATION_HALVINGS) -> float:
    """The largest threshold found whose result is at least `target_db` from the uncached one, by
    bisection in [0, highest] (threshold 0 never reuses: its result is the uncached one).
    `psnr_at(threshold)` samples once with that threshold and measures its PSNR."""
    if psnr_at(highest) >= target_db:
        return highest
    low, high = 0.0, highest
    for _ in range(halvings):
        middle = (low + high) / 2
        if psnr_at(middle) >= target_db:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class CachePolicy:
    """How a run decides and predicts (see the module's description)."""
    residual_diff_threshold: float
    max_consecutive_hits: int = 0
    prediction_order: int = 0
    every_n_steps: int = 0


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

    def get_or_zeros(self, keys: Sequence[Hashable], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The keys' rows; zeros of `dtype` shaped like its chunk of `like` for a key that holds none."""
        return torch.cat([self._rows[key] if key in self._rows else torch.zeros_like(rows, dtype=dtype)
                          for key, rows in zip(keys, like.chunk(len(keys)))])

    def copy_into(self, keys: Sequence[Hashable], batch: torch.Tensor) -> None:
        """Writes the rows held for keys[i] into chunk i of `batch`, where they have its shape and are
        not those very rows already (stored as views of `batch`)."""
        for key, rows in zip(keys, batch.chunk(len(keys))):
            held = self._rows.get(key)
            if held is not None and held.shape == rows.shape and not same_memory(held, rows):
                rows.copy_(held)

    def clear(self) -> None:
        self._rows.clear()


@dataclass
class PredictionState:
    """What a prediction reads, for the rows of one call: the last computed residual, and at orders
    1 and 2 its slope and curvature in sigma (float32)."""
    residual: torch.Tensor
    slope: Optional[torch.Tensor] = None
    curvature: Optional[torch.Tensor] = None


class ResidualCache:
    """State of one sampling run: reference residuals, stored residuals and their history, the step's decision."""

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.stats = CacheStats()
        self.distances: list[float] = []
        self._probe_residuals = RowStore()
        self._residuals = RowStore()
        self._slopes = RowStore()
        self._curvatures = RowStore()
        # Per key, the sigmas of its last computed steps, latest first.
        self._computed_sigmas: dict[Hashable, list[float]] = {}
        self._consecutive_hits = 0
        self._step_decision: Optional[bool] = None
        # The latest start_step's arguments and how many steps started: what another process
        # mirrors to keep its own cache of the same run in step (context parallel).
        self.last_sigma: Optional[float] = None
        self.reuse_allowed = False
        self.steps_started = 0

    @property
    def order(self) -> int:
        return self.policy.prediction_order

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
        for store in (self._probe_residuals, self._residuals, self._slopes, self._curvatures):
            store.clear()
        self._computed_sigmas.clear()
        self._consecutive_hits = 0

    def should_reuse(self, keys: Sequence[Hashable], probe_residual: torch.Tensor,
                     reduce_sums: Optional[ReduceSums] = None, measured_sums: Optional[torch.Tensor] = None) -> bool:
        """Decides, for this call, whether the skippable blocks are skipped.

        The first call of a step decides for the whole step; later calls (uncond after cond, when
        ComfyUI evaluates them separately) follow it when their own residuals are stored.
        `reduce_sums` sums the distance's parts across ranks when each holds a share of the tokens
        (context parallel), so every rank measures the whole residual and decides alike.
        `measured_sums`: those sums already measured on the device against the stored probe
        residuals (a replayed CUDA graph did), read only when the decision needs them.
        """
        if self._step_decision is None:
            self._step_decision = self._decide(keys, probe_residual, reduce_sums, measured_sums)
            if self._step_decision:
                self.stats.reused_steps += 1
                self._consecutive_hits += 1
            else:
                self.stats.computed_steps += 1
                self._consecutive_hits = 0
        return self._step_decision and self._residuals.has(keys)

    def _decide(self, keys: Sequence[Hashable], probe_residual: torch.Tensor,
                reduce_sums: Optional[ReduceSums], measured_sums: Optional[torch.Tensor]) -> bool:
        policy = self.policy
        if not self.reuse_allowed or (policy.residual_diff_threshold <= 0.0 and policy.every_n_steps == 0):
            return False
        limit = policy.every_n_steps - 1 if policy.every_n_steps > 0 else policy.max_consecutive_hits
        if 0 < limit <= self._consecutive_hits or policy.every_n_steps == 1:
            return False
        if not (self._probe_residuals.has(keys, probe_residual) and self._residuals.has(keys)):
            return False
        if policy.every_n_steps > 0:
            return True
        if measured_sums is None:
            measured_sums = distance_sums(probe_residual, self._probe_residuals.get(keys), reduce_sums)
        distance = relative_l1_distance(measured_sums)
        self.distances.append(distance)
        return distance < policy.residual_diff_threshold

    # ---- launched calls: tensors stored as computed ----

    def store_probe_residual(self, keys: Sequence[Hashable], probe_residual: torch.Tensor) -> None:
        self._probe_residuals.put(keys, probe_residual)

    def predicted_residual(self, keys: Sequence[Hashable], device) -> torch.Tensor:
        """The skipped blocks' residual predicted for this step (a new tensor at orders 1 and 2)."""
        state = PredictionState(self._residuals.get(keys))
        if self.order >= 1:
            state.slope = self._slopes.get(keys)
            state.curvature = self._curvatures.get(keys) if self.order >= 2 else None
        return taylor_prediction(state.residual, state.slope, state.curvature,
                                 self.prediction_coefficients(keys, state.residual.shape[0], device), self.order)

    def store_computed_residual(self, keys: Sequence[Hashable], residual: torch.Tensor) -> None:
        """Stores the skippable blocks' residual of a computed step, with its slope and curvature."""
        if self.order >= 1:
            factors = self.difference_factors(keys, residual.shape[0], residual.device)
            slope, curvature = taylor_differences(residual, self._residuals.get_or_zeros(keys, residual, residual.dtype),
                                                  self._slopes.get_or_zeros(keys, residual, torch.float32), factors,
                                                  self.order)
            self._slopes.put(keys, slope)
            if curvature is not None:
                self._curvatures.put(keys, curvature)
        self._residuals.put(keys, residual)
        self.note_computed(keys)

    # ---- replayed calls: the captured forward's own tensors, written by its graphs ----

    def copy_stored_into(self, keys: Sequence[Hashable], probe_references: torch.Tensor,
                         state: PredictionState) -> None:
        """Writes the keys' stored tensors into these (a captured forward's own, which its graphs read),
        where they are not there already: what an earlier call stored elsewhere (a launched call, or a
        forward of another batch layout) is handed over. Rows of keys with nothing stored are zeroed, as
        the launched path reads zeros there (a Taylor term is multiplied by 0 until it is known, and
        0 * NaN, from a stale row, is not 0)."""
        self._probe_residuals.copy_into(keys, probe_references)
        for store, tensor in ((self._residuals, state.residual), (self._slopes, state.slope),
                              (self._curvatures, state.curvature)):
            if tensor is not None:
                for key, rows in zip(keys, tensor.chunk(len(keys))):
                    if not store.has([key]):
                        rows.zero_()
                store.copy_into(keys, tensor)

    def store_views(self, keys: Sequence[Hashable], probe_references: torch.Tensor, state: PredictionState) -> None:
        """A computed step of a replayed forward: its graphs write these tensors, the store keeps views."""
        self._probe_residuals.put(keys, probe_references)
        self._residuals.put(keys, state.residual)
        if state.slope is not None:
            self._slopes.put(keys, state.slope)
        if state.curvature is not None:
            self._curvatures.put(keys, state.curvature)
        self.note_computed(keys)

    # ---- the host's numbers for the device's math ----

    def prediction_coefficients(self, keys: Sequence[Hashable], rows: int, device,
                                out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """[2, rows, 1, 1] float32: c1 = s - s_k and c2 = (s - s_k)(s - s_k-1) per key's rows at this
        step's sigma s, 0 while the key has too few computed steps (None at order 0)."""
        if self.order == 0:
            return None
        sigma = self.last_sigma

        def coefficients(sigmas):
            c1 = sigma - sigmas[0] if len(sigmas) >= COMPUTES_FOR_SLOPE else 0.0
            c2 = (sigma - sigmas[0]) * (sigma - sigmas[1]) if len(sigmas) >= COMPUTES_FOR_CURVATURE else 0.0
            return c1, c2
        return self._per_key(keys, rows, device, out, coefficients)

    def difference_factors(self, keys: Sequence[Hashable], rows: int, device,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[2, rows, 1, 1] float32: 1 / (s - s_k) and 1 / (s - s_k-1) per key's rows for a step computed at
        this sigma s, 0 where the key has too few computed steps (or the same sigma again)."""
        sigma = self.last_sigma

        def factors(sigmas):
            return tuple(1.0 / (sigma - sigmas[index]) if len(sigmas) > index and sigma != sigmas[index] else 0.0
                         for index in range(2))
        return self._per_key(keys, rows, device, out, factors)

    def _per_key(self, keys, rows, device, out, values_of_history):
        """A [2, rows, 1, 1] float32 tensor (`out` if given) filled with each key's two values on its rows."""
        if out is None:
            out = torch.empty(2, rows, 1, 1, dtype=torch.float32, device=device)
        for key, key_rows in zip(keys, out.chunk(len(keys), dim=1)):
            for term, value in zip(key_rows, values_of_history(self._computed_sigmas.get(key, []))):
                term.fill_(value)
        return out

    def note_computed(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            earlier = self._computed_sigmas.get(key, [])
            self._computed_sigmas[key] = [self.last_sigma] + earlier[:COMPUTES_FOR_CURVATURE - 1]
