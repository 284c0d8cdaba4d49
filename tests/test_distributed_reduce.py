"""The column-wise reduction of the gathered signal matrix (no processes needed)."""

from __future__ import annotations

import math

import pytest
import torch

from lbw_policy.adapters.distributed import _CODES, _reduce, resolve_distributed

NAN = math.nan


def _run(rows, present, reductions):
    v = torch.tensor(rows, dtype=torch.float64)
    p = torch.tensor(present, dtype=torch.bool)
    codes = torch.tensor([_CODES[r] for r in reductions])
    return _reduce(v, p, codes).tolist()


def test_each_reduction_over_the_present_ranks():
    rows = [[1.0, 1.0, 1.0, 1.0, 0.0, 7.0],
            [3.0, 5.0, -2.0, 2.0, 0.0, 8.0],
            [99.0, 99.0, 99.0, 99.0, 99.0, 9.0]]      # rank 2 is absent except in "any"/"same"
    present = [[1, 1, 1, 1, 1, 0],
               [1, 1, 1, 1, 1, 1],
               [0, 0, 0, 0, 1, 1]]
    got = _run(rows, present, ["mean", "max", "min", "sum", "any", "same"])
    assert got == [2.0, 5.0, -2.0, 3.0, 1.0, 8.0]  # same: the lowest present rank (1)


def test_a_nan_on_one_rank_is_the_reduced_value_and_absent_everywhere_is_nan():
    got = _run([[NAN, 1.0, NAN, 0.0], [2.0, NAN, 3.0, 0.0]], [[1, 1, 1, 0], [1, 1, 1, 0]],
               ["mean", "max", "min", "mean"])
    assert math.isnan(got[0]) and math.isnan(got[1]) and math.isnan(got[2])
    assert math.isnan(got[3])  # no rank has it


def test_any_counts_nan_and_nonzero_as_true():
    assert _run([[0.0, 0.0], [NAN, 0.0]], [[1, 1], [1, 1]], ["any", "any"]) == [1.0, 0.0]


def test_resolve_distributed_without_a_process_group():
    assert resolve_distributed("auto") is None
    assert resolve_distributed(False) is None
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        resolve_distributed(True)
    with pytest.raises(ValueError, match="distributed must be"):
        resolve_distributed("yes")
