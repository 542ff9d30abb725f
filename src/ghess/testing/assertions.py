"""Assertions for comparing ghess's results with references."""

import numpy as np

__all__ = ["assert_allclose_rel"]


def assert_allclose_rel(actual, desired, rtol, err_msg=""):
    """Assert ``||actual - desired|| <= rtol * max(||desired||, tiny)`` (Frobenius norms).

    A norm-wise relative check: unlike ``numpy.testing.assert_allclose`` it does
    not fail on entries that are tiny next to the rest of the array.

    Parameters
    ----------
    actual, desired : array_like of the same shape
    rtol : float
    err_msg : str, optional
        Prepended to the failure message.

    Raises
    ------
    AssertionError
        On a shape mismatch, non-finite values, or a relative error above ``rtol``.
    """
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    prefix = f"{err_msg}: " if err_msg else ""
    if actual.shape != desired.shape:
        raise AssertionError(f"{prefix}shape mismatch: actual {actual.shape}, "
                             f"desired {desired.shape}")
    err = np.linalg.norm((actual - desired).ravel())
    ref = np.linalg.norm(desired.ravel())
    rel = err / max(ref, np.finfo(np.float64).tiny)
    if not rel <= rtol:  # also fails on NaN
        raise AssertionError(f"{prefix}relative error {rel:.3e} exceeds rtol {rtol:.1e} "
                             f"(||actual - desired|| = {err:.3e}, ||desired|| = {ref:.3e})")
