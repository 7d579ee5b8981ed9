"""Inductor heuristics for FLUX's compiled blocks, installed only while Compile FLUX's backend compiles.

Inductor holds a reduction's row in registers (a "persistent" reduction: the row is read once) only up to
1024 elements, and loops over longer rows. Each FLUX block layer-norms 3072-wide rows, modulates them and
takes the modulated row's absmax for its FP8 scale: looped, inductor's kernel read every row three times
(48-60 us per call on an H200 at 1024², 4.9 ms of a 90 ms step). Persistent up to 4096 elements, FP8 +
Compile FLUX + FLUX Attention Backend took 2.44-2.47 s instead of 2.51 (same machine, processes alternated).
"""
import contextlib

import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

PERSISTENT_ROW_LIMIT = 4096


class WideRowReductions(InductorChoices):
    """Inductor's own choices, except that rows up to PERSISTENT_ROW_LIMIT elements are reduced persistently."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        # Inner reductions only (a row's elements contiguous), and never where inductor was told not to or
        # fixes a sum's block size (its "strict sums", in torch releases that have them).
        strict_sum_block = getattr(features, "strict_sum_rblock", lambda: None)()
        return (torch._inductor.config.triton.persistent_reductions and not cooperative_reduction
                and strict_sum_block is None and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_LIMIT))


@contextlib.contextmanager
def wide_row_reductions():
    """Inductor compiles with `WideRowReductions` inside this block (on this thread)."""
    with V.set_choices_handler(WideRowReductions()):
        yield
