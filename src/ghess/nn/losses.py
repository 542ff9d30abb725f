"""Losses with PyTorch's semantics: value, gradient, and output-space Hessian B.

Each loss works on network outputs ``z`` of shape ``(N, K)``. With
``reduction="mean"`` the normalisation uses the TOTAL number of samples over
all batches, so a result over several batches equals the result on their
concatenation.
"""

from __future__ import annotations

import abc
import numbers
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import special

from .._kernels import dense
from .._kernels.dense import OutputHessianKind
from .._validation import as_array, as_float_array

__all__ = ["Loss", "MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"]


class Loss(abc.ABC):
    """Base class.

    Parameters
    ----------
    reduction : {"mean", "sum"}, default="mean"
        As in PyTorch: ``"mean"`` divides the summed losses by the loss's
        normaliser (``N`` or ``N K``, see each loss), ``"sum"`` does not.
    factor : float, default=1.0
        A positive constant multiplying the loss, its gradient and its
        curvature: ``0.5`` gives scikit-learn's squared loss, for example.
    """

    def __init__(self, reduction: Literal["mean", "sum"] = "mean", *,
                 factor: float = 1.0) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(self).__name__}: reduction must be 'mean' or 'sum', got {reduction!r}")
        if (isinstance(factor, (bool, np.bool_)) or not isinstance(factor, numbers.Real)
                or not (np.isfinite(factor) and factor > 0)):
            raise ValueError(
                f"{type(self).__name__}: factor must be a finite number > 0, got {factor!r}")
        self.reduction = reduction
        self.factor = float(factor)

    def __repr__(self):
        factor = "" if self.factor == 1.0 else f", factor={self.factor!r}"
        return f"{type(self).__name__}(reduction={self.reduction!r}{factor})"

    def scale(self, n_samples: int, n_outputs: int) -> float:
        """Factor applied to the summed per-sample losses: ``factor`` / the normaliser."""
        if self.reduction == "sum":
            return self.factor
        return self.factor / self.normaliser(n_samples, n_outputs)

    def normaliser(self, n_samples: int, n_outputs: int) -> int:
        """Return what ``reduction="mean"`` divides by (``N`` unless a loss says otherwise)."""
        return n_samples

    @abc.abstractmethod
    def check_targets(self, y, n_samples, n_outputs, dtype):
        """Validate targets and return them converted for the kernels."""

    def example_targets(self, n_samples: int, n_outputs: int, dtype) -> np.ndarray:
        """Return valid targets (zeros) of the right shape and dtype, for dry runs."""
        return np.zeros((n_samples, n_outputs), dtype=dtype)

    @abc.abstractmethod
    def value_grad(self, z, y, scale, n_threads):
        """Return ``(sum of per-sample losses, scale * dl/dz, state for B)``."""

    @abc.abstractmethod
    def hessian_form(self, state, scale):
        """Return ``(kind, array, factor)``: ``scale * B_i`` is ``factor`` times B of ``kind``.

        ``kind`` is an ``OutputHessianKind``: ``IDENTITY`` (``array`` None),
        ``SOFTMAX`` (``array``: the softmax p, (n, K)) or ``DIAGONAL``
        (``array``: the diagonal, (n, K)); ``state`` is what ``value_grad`` returned.
        """

    def hessian_kernel_args(self, state, scale, dtype):
        """``hessian_form`` as the kernels take it: ``(kind, (n, K) or (0, 0) array, factor)``."""
        kind, array, factor = self.hessian_form(state, scale)
        return kind, (np.empty((0, 0), dtype=dtype) if array is None else array), factor

    def hessian_apply(self, state, x, scale, out, n_threads):
        """``out[i, j] = scale * B_i x[i, j]`` for x of shape (n, k, K)."""
        kind, array, factor = self.hessian_kernel_args(state, scale, x.dtype)
        dense.output_hessian_apply(kind, array, factor, x, out, n_threads)

    def hessian_sqrt(self, state, z, scale):
        """Return S (n, K, r) with ``S[i] @ S[i].T == scale * B_i``: the type-2 Fisher's columns.

        ``state`` is what ``value_grad`` returned for the outputs ``z`` (n, K). r is
        K, or K - 1 for the softmax's B (rank K - 1): one column fewer to
        back-propagate.
        """
        kind, array, factor = self.hessian_form(state, scale)
        n, K = z.shape
        root = z.dtype.type(np.sqrt(factor))
        if kind == OutputHessianKind.IDENTITY:
            return np.broadcast_to(root * np.eye(K, dtype=z.dtype), (n, K, K)).copy()
        if kind == OutputHessianKind.DIAGONAL:
            S = np.zeros((n, K, K), dtype=z.dtype)
            S[:, np.arange(K), np.arange(K)] = root * np.sqrt(array)
            return S
        # diag(p) - p p^T = T T^T with T = (I - p 1^T) diag(sqrt p), whose columns
        # sqrt(p_j) (e_j - p) all lie in u^perp, u = sqrt(p) (a unit vector: T u = 0). With
        # the Householder reflection H = I - 2 w w^T, w = (u + e_K) / |u + e_K| (never
        # short: u_K >= 0), H e_K = -u, so H's first K - 1 columns span u^perp and
        # S = T H[:, :K-1] keeps T T^T = S S^T with K - 1 columns.
        if K == 1:
            return np.zeros((n, 1, 1), dtype=z.dtype)
        p = array.astype(np.float64)
        u = np.sqrt(p)
        T = -p[:, :, None] * u[:, None, :]
        T[:, np.arange(K), np.arange(K)] += u
        w = u.copy()
        w[:, -1] += 1.0
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        S = T[:, :, :-1] - 2.0 * np.matmul(T, w[:, :, None]) * w[:, None, :-1]
        return (root * S).astype(z.dtype)

    def sample_targets(self, z: np.ndarray, rng: np.random.Generator, n_draws: int) -> np.ndarray:
        """Draw ``n_draws`` targets per sample from the model's predictive distribution.

        The distribution whose negative log-likelihood this loss is (up to
        constants), at the outputs ``z`` (n, K); the result has a leading axis of
        ``n_draws``. Sample by sample in order, so a data set cut into other
        chunks draws the same targets from the same generator. Each target takes
        exactly :meth:`random_draws_per_target` 64-bit draws of ``rng`` (uniforms
        from ``rng.random``), so a rank of a data-parallel run can skip the draws
        of the samples before its shard.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no predictive distribution to sample targets from "
            "(the Monte-Carlo Fisher needs one): define sample_targets")

    def random_draws_per_target(self, n_outputs: int) -> int:
        """64-bit draws of the generator that :meth:`sample_targets` takes per target."""
        raise NotImplementedError(
            f"{type(self).__name__} does not say how many draws of the generator a target "
            "takes (a data-parallel Monte-Carlo Fisher needs it to skip to its shard): "
            "define random_draws_per_target")

    def __call__(self, outputs: npt.ArrayLike, targets: npt.ArrayLike) -> float:
        """Loss of network outputs (N, K) against targets, as a float."""
        z = as_float_array(outputs, "outputs", ndim=2)
        if z.shape[0] == 0:
            raise ValueError("outputs is empty: got 0 samples")
        y = self.check_targets(targets, z.shape[0], z.shape[1], z.dtype)
        scale = self.scale(z.shape[0], z.shape[1])
        total, _, _ = self.value_grad(z, y, scale, 1)
        return float(scale * total)


def _value_grad(kernel, z, y, scale, n_threads, with_state=True):
    """Run a loss kernel: (sum of per-sample losses, scale * dl/dz, its state for B or None).

    The state is the softmax (cross-entropy) or sigma' (BCE) the kernel writes.
    """
    losses = np.empty(z.shape[0])
    r = np.empty_like(z)
    state = np.empty_like(z) if with_state else None
    kernel(z, y, scale, losses, r, *(() if state is None else (state,)), n_threads)
    return float(losses.sum()), r, state


def _float_targets(y, n_samples, n_outputs, dtype, owner):
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

    def normaliser(self, n_samples, n_outputs):
        """N K: the mean runs over every output of every sample."""
        return n_samples * n_outputs

    def check_targets(self, y, n_samples, n_outputs, dtype):
        """Real targets of the outputs' shape (N, K)."""
        return _float_targets(y, n_samples, n_outputs, dtype, "MSELoss")

    def value_grad(self, z, y, scale, n_threads):
        """Return the summed squared errors, scale * 2 (z - y), and no state."""
        return _value_grad(dense.mse_value_grad, z, y, scale, n_threads, with_state=False)

    def hessian_form(self, state, scale):
        """B = 2 I (times the scale)."""
        return OutputHessianKind.IDENTITY, None, 2.0 * scale

    def sample_targets(self, z, rng, n_draws):
        """Targets z + e, e ~ N(0, I / 2): (z - y)^2 is their negative log-likelihood.

        The normals by inverse CDF of uniforms (one draw each, unlike numpy's
        variable-length ziggurat); a uniform of exactly 0 is moved to 2**-54.
        """
        u = np.maximum(rng.random((z.shape[0], n_draws, z.shape[1])), 2.0**-54)
        noise = special.ndtri(u)
        return (z[:, None, :] + np.sqrt(0.5) * noise).astype(z.dtype).transpose(1, 0, 2)

    def random_draws_per_target(self, n_outputs):
        """One uniform per output."""
        return n_outputs


class CrossEntropyLoss(Loss):
    r"""Softmax cross-entropy on logits with integer labels, as ``torch.nn.CrossEntropyLoss``.

    :math:`\ell_n = \log \sum_k e^{z_{nk}} - z_{n y_n}`, divided by :math:`N` for
    ``reduction="mean"``. Output-space Hessian :math:`B_n = \mathrm{diag}(p_n) - p_n p_n^T`
    with :math:`p_n = \mathrm{softmax}(z_n)`.
    """

    def check_targets(self, y, n_samples, n_outputs, dtype):
        """Integer labels (N,) in [0, K)."""
        y = as_array(y)
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

    def example_targets(self, n_samples, n_outputs, dtype):
        """Label 0 for every sample (dry runs of a computation)."""
        return np.zeros(n_samples, dtype=np.intp)

    def value_grad(self, z, y, scale, n_threads):
        """Return the summed cross-entropies, scale * (p - onehot), and the softmax p."""
        return _value_grad(dense.cross_entropy_value_grad, z, y, scale, n_threads)

    def hessian_form(self, state, scale):
        """B = diag(p) - p p^T (times the scale)."""
        return OutputHessianKind.SOFTMAX, state, scale

    def sample_targets(self, z, rng, n_draws):
        """Labels y ~ Categorical(softmax(z)), by inverse CDF of uniforms."""
        z64 = z.astype(np.float64)
        p = np.exp(z64 - z64.max(axis=1, keepdims=True))
        cdf = np.cumsum(p, axis=1)
        u = rng.random((z.shape[0], n_draws)) * cdf[:, -1:]
        labels = (u[:, :, None] >= cdf[:, None, :]).sum(axis=2)
        return np.minimum(labels, z.shape[1] - 1).T.astype(np.intp)

    def random_draws_per_target(self, n_outputs):
        """One uniform per label."""
        return 1


class BCEWithLogitsLoss(Loss):
    r"""Binary cross-entropy on logits, as ``torch.nn.BCEWithLogitsLoss``.

    :math:`\ell = \sum_{n,k} \log(1 + e^{z_{nk}}) - y_{nk} z_{nk}`, divided by :math:`N K`
    for ``reduction="mean"``; targets lie in [0, 1] and have the outputs' shape.
    Output-space Hessian :math:`B_n = \mathrm{diag}(\sigma(z_n)(1 - \sigma(z_n)))`.
    """

    def normaliser(self, n_samples, n_outputs):
        """N K: the mean runs over every output of every sample."""
        return n_samples * n_outputs

    def check_targets(self, y, n_samples, n_outputs, dtype):
        """Targets in [0, 1] of the outputs' shape (N, K)."""
        y = _float_targets(y, n_samples, n_outputs, dtype, "BCEWithLogitsLoss")
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(
                f"BCEWithLogitsLoss: targets must lie in [0, 1], got values in "
                f"[{y.min()}, {y.max()}]")
        return y

    def value_grad(self, z, y, scale, n_threads):
        """Return the summed binary cross-entropies, scale * (sigma(z) - y), and sigma'."""
        return _value_grad(dense.bce_value_grad, z, y, scale, n_threads)

    def hessian_form(self, state, scale):
        """B = diag(sigma') (times the scale)."""
        return OutputHessianKind.DIAGONAL, state, scale

    def sample_targets(self, z, rng, n_draws):
        """Binary targets y ~ Bernoulli(sigma(z))."""
        u = rng.random((z.shape[0], n_draws, z.shape[1]))
        sigma = special.expit(z.astype(np.float64))
        return (u < sigma[:, None, :]).astype(z.dtype).transpose(1, 0, 2)

    def random_draws_per_target(self, n_outputs):
        """One uniform per output."""
        return n_outputs
