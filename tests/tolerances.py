"""How far apart two correct computations of the same floating-point values may be.

Kernels sum in an order chosen by the library, the CPU's vector width and the thread
count, so our encoder and transformers', FAISS and numpy, or one implementation on two
CPUs, agree only up to rounding. Rounding errors in a sum of K terms mostly cancel and
leave about sqrt(K)·eps times the size of the terms; each of the two results carries such
an error. The tolerance is therefore relative to the magnitude of the terms and to the
dtype, not to each compared element: an element that is small because its terms cancel
still carries their error, and a fixed absolute tolerance is a few ulps at magnitude 10
but hides everything at magnitude 1e-6.
"""

from __future__ import annotations

import math

import torch


def summation_tolerance(terms: int, dtype: torch.dtype = torch.float32) -> float:
    """Tolerance, relative to the terms' magnitude, between two ``terms``-term sums."""
    return 2 * math.sqrt(terms) * torch.finfo(dtype).eps


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: float, msg: str | None = None
) -> None:
    """Every element within ``tolerance * max|expected|`` of ``expected``."""
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0,
        atol=tolerance * expected.abs().max().item(),
        msg=None if msg is None else lambda generated: f"{msg}: {generated}",
    )


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, *, terms: int, msg: str | None = None
) -> None:
    """Every element within ``summation_tolerance(terms) * max|expected|`` of ``expected``,
    in ``expected``'s dtype.

    ``terms`` is the longest sum behind each value (an encoder's ``intermediate_size``);
    ``max|expected|`` stands for the size of its terms.
    """
    assert_close(actual, expected, summation_tolerance(terms, expected.dtype), msg)


def assert_same_neighbours(scores, ids, ref_scores, ref_ids, tol: float) -> None:
    """Search results ``(scores, ids)`` equal to the reference's: scores within ``tol``, and
    ids wherever a score is apart from its neighbours by more than both can move (no tie or
    near-tie), which must be most of them."""
    import numpy as np

    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=tol)
    gaps = np.abs(np.diff(ref_scores, axis=1))
    alone = np.ones_like(ref_scores, dtype=bool)
    alone[:, 1:] &= gaps > 2 * tol
    alone[:, :-1] &= gaps > 2 * tol
    assert alone.mean() > 0.9
    np.testing.assert_array_equal(ids[alone], ref_ids[alone])
