"""Losses with PyTorch's semantics: value, gradient, and output-space Hessian B.

Each loss works on network outputs ``z`` of shape ``(N, K)``. With
``reduction="mean"`` the normalisation uses the TOTAL number of samples over
all batches, so a result over several batches equals the result on their
concatenation.
"""

import numpy as np

from ._kernels import dense
from ._kernels.dense import OutputHessianKind

__all__ = ["Loss", "MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"]


class Loss:
    """Base class: ``reduction`` is ``"mean"`` (default) or ``"sum"``."""

    def __init__(self, reduction="mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(self).__name__}: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def __repr__(self):
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def scale(self, n_samples, n_outputs):
        """Factor applied to the summed per-sample losses (1 for ``"sum"``)."""
        return 1.0

    def check_targets(self, y, n_samples, n_outputs, dtype):
        """Validate targets and return them converted for the kernels."""
        raise NotImplementedError

    def value_grad(self, z, y, scale, n_threads):
        """Return ``(sum of per-sample losses, scale * dl/dz, state for B)``."""
        raise NotImplementedError

    def hessian_form(self, state, scale):
        """Return ``(kind, array, factor)``: ``scale * B_i`` is ``factor`` times B of ``kind``.

        ``kind`` is an ``OutputHessianKind``: ``IDENTITY`` (``array`` None), ``SOFTMAX``
        (``array``: the softmax p, (n, K)) or ``DIAGONAL`` (``array``: the
        diagonal, (n, K)); ``state`` is what ``value_grad`` returned.
        """
        raise NotImplementedError

    def hessian_kernel_args(self, state, scale, dtype):
        """``hessian_form`` as the kernels take it: ``(kind, (n, K) or (0, 0) array, factor)``."""
        kind, array, factor = self.hessian_form(state, scale)
        return kind, (np.empty((0, 0), dtype=dtype) if array is None else array), factor

    def hessian_apply(self, state, x, scale, out, n_threads):
        """``out[i, j] = scale * B_i x[i, j]`` for x of shape (n, k, K)."""
        kind, array, factor = self.hessian_kernel_args(state, scale, x.dtype)
        dense.output_hessian_apply(kind, array, factor, x, out, n_threads)

    def __call__(self, outputs, targets):
        """Loss of network outputs (N, K) against targets, as a float."""
        from ._validation import as_float_array

        z = as_float_array(outputs, "outputs", ndim=2)
        if z.shape[0] == 0:
            raise ValueError("outputs is empty: got 0 samples")
        y = self.check_targets(targets, z.shape[0], z.shape[1], z.dtype)
        scale = self.scale(z.shape[0], z.shape[1])
        total, _, _ = self.value_grad(z, y, scale, 1)
        return float(scale * total)


def _float_targets(y, n_samples, n_outputs, dtype, owner):
    from ._validation import as_float_array

    y = as_float_array(y, "targets", dtype=dtype)
    if y.shape != (n_samples, n_outputs):
        raise ValueError(
            f"{owner}: targets must have the outputs' shape ({n_samples}, {n_outputs}), "
            f"got {y.shape}")
    return y


class MSELoss(Loss):
    r"""Squared error, as ``torch.nn.MSELoss``.

    :math:`\ell = \sum_{n,k} (z_{nk} - y_{nk})^2`, divided by :math:`N K` for
    ``reduction="mean"``. Output-space Hessian :math:`B_n = 2 I` (times the scale).
    """

    def scale(self, n_samples, n_outputs):  # noqa: D102
        return 1.0 / (n_samples * n_outputs) if self.reduction == "mean" else 1.0

    def check_targets(self, y, n_samples, n_outputs, dtype):  # noqa: D102
        return _float_targets(y, n_samples, n_outputs, dtype, "MSELoss")

    def value_grad(self, z, y, scale, n_threads):  # noqa: D102
        losses = np.empty(z.shape[0])
        r = np.empty_like(z)
        dense.mse_value_grad(z, y, scale, losses, r, n_threads)
        return float(losses.sum()), r, None

    def hessian_form(self, state, scale):  # noqa: D102
        return OutputHessianKind.IDENTITY, None, 2.0 * scale


class CrossEntropyLoss(Loss):
    r"""Softmax cross-entropy on logits with integer labels, as ``torch.nn.CrossEntropyLoss``.

    :math:`\ell_n = \log \sum_k e^{z_{nk}} - z_{n y_n}`, divided by :math:`N` for
    ``reduction="mean"``. Output-space Hessian :math:`B_n = \mathrm{diag}(p_n) - p_n p_n^T`
    with :math:`p_n = \mathrm{softmax}(z_n)`.
    """

    def scale(self, n_samples, n_outputs):  # noqa: D102
        return 1.0 / n_samples if self.reduction == "mean" else 1.0

    def check_targets(self, y, n_samples, n_outputs, dtype):  # noqa: D102
        y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise TypeError(
                f"CrossEntropyLoss: labels must be integers of shape ({n_samples},), "
                f"got dtype {y.dtype}")
        if y.shape != (n_samples,):
            raise ValueError(
                f"CrossEntropyLoss: labels must have shape ({n_samples},), got {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= n_outputs):
            bad = y[(y < 0) | (y >= n_outputs)][0]
            raise ValueError(
                f"CrossEntropyLoss: labels must lie in [0, {n_outputs}) for a network with "
                f"{n_outputs} outputs, got label {bad}")
        return np.ascontiguousarray(y, dtype=np.intp)

    def value_grad(self, z, y, scale, n_threads):  # noqa: D102
        losses = np.empty(z.shape[0])
        r = np.empty_like(z)
        p = np.empty_like(z)
        dense.cross_entropy_value_grad(z, y, scale, losses, r, p, n_threads)
        return float(losses.sum()), r, p

    def hessian_form(self, state, scale):  # noqa: D102
        return OutputHessianKind.SOFTMAX, state, scale


class BCEWithLogitsLoss(Loss):
    r"""Binary cross-entropy on logits, as ``torch.nn.BCEWithLogitsLoss``.

    :math:`\ell = \sum_{n,k} \log(1 + e^{z_{nk}}) - y_{nk} z_{nk}`, divided by :math:`N K`
    for ``reduction="mean"``; targets lie in [0, 1] and have the outputs' shape.
    Output-space Hessian :math:`B_n = \mathrm{diag}(\sigma(z_n)(1 - \sigma(z_n)))`.
    """

    def scale(self, n_samples, n_outputs):  # noqa: D102
        return 1.0 / (n_samples * n_outputs) if self.reduction == "mean" else 1.0

    def check_targets(self, y, n_samples, n_outputs, dtype):  # noqa: D102
        y = _float_targets(y, n_samples, n_outputs, dtype, "BCEWithLogitsLoss")
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(
                f"BCEWithLogitsLoss: targets must lie in [0, 1], got values in "
                f"[{y.min()}, {y.max()}]")
        return y

    def value_grad(self, z, y, scale, n_threads):  # noqa: D102
        losses = np.empty(z.shape[0])
        r = np.empty_like(z)
        h = np.empty_like(z)
        dense.bce_value_grad(z, y, scale, losses, r, h, n_threads)
        return float(losses.sum()), r, h

    def hessian_form(self, state, scale):  # noqa: D102
        return OutputHessianKind.DIAGONAL, state, scale
