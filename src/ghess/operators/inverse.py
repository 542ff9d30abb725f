"""The inverse of a linear operator, each product a solve: CG, LSMR or a Neumann series."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, lsmr

from .._validation import check_positive_int
from .base import BatchedMatvec, check_vectors

__all__ = ["InverseLinearOperator"]

METHODS = ("cg", "lsmr", "neumann")


class InverseLinearOperator(BatchedMatvec, LinearOperator):
    r"""``A^{-1}`` as a ``LinearOperator``: every product solves ``A x = b`` for its columns.

    Parameters
    ----------
    op : LinearOperator
        A square operator: for ``"cg"`` and ``"neumann"`` symmetric positive
        definite (a damped GGN, a Fisher or KFAC plus damping); for ``"lsmr"``
        any, the product then being the least-squares solution.
    method : {"cg", "lsmr", "neumann"}, default="cg"
        ``"cg"``: SciPy's ``cg`` to ``||A x - b|| <= max(rtol ||b||, atol)``, with
        ``preconditioner`` as its ``M`` (e.g. ``KFACLinearOperator(...).inverse(damping)``);
        ``"lsmr"``: SciPy's ``lsmr`` with ``atol = btol = rtol``;
        ``"neumann"``: ``x = scale sum_{k<terms} (I - scale A)^k b``, which converges
        when the eigenvalues of ``A`` lie in ``(0, 2 / scale)``; ``scale``
        defaults to ``1 / lambda_max`` (20 power iterations, times 0.95).
    rtol, atol : float, default=1e-8, 0.0
    maxiter : int, optional
        For CG and LSMR (SciPy's defaults when None).
    preconditioner : LinearOperator, optional
        CG's preconditioner (an approximation of ``A^{-1}``).
    terms : int, default=100
        Terms of the Neumann series.
    scale : float, optional
        The Neumann series' scale.

    Attributes
    ----------
    info : list of int
        Per column of the last product: the solver's iterations (CG, LSMR), or
        ``terms``. A solve that stops short of its tolerance warns.

    Examples
    --------
    >>> import numpy as np, ghess
    >>> model = ghess.Sequential(ghess.Linear(3, 2), input_shape=(3,))
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(20, 3)), rng.integers(0, 2, size=20)
    >>> G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), model.init_params(),
    ...                             (X, y), damping=1e-2)
    >>> Ginv = ghess.InverseLinearOperator(G, rtol=1e-10)
    >>> v = np.ones(G.shape[0])
    >>> bool(np.allclose(G @ (Ginv @ v), v))
    True
    """

    def __init__(self, op, method="cg", *, rtol=1e-8, atol=0.0, maxiter=None,
                 preconditioner=None, terms=100, scale=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        op = aslinearoperator(op)
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"op must be square, got shape {op.shape}")
        for value, name in ((rtol, "rtol"), (atol, "atol")):
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.op, self.method, self.rtol, self.atol = op, method, float(rtol), float(atol)
        self.maxiter = None if maxiter is None else check_positive_int(maxiter, "maxiter")
        self.preconditioner = preconditioner
        self.terms = check_positive_int(terms, "terms")
        if scale is not None and not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = scale
        self.info = []
        super().__init__(dtype=np.dtype(op.dtype), shape=op.shape)

    def _neumann_scale(self):
        if self.scale is None:  # 1 / lambda_max by power iteration, with a margin
            x = np.random.default_rng(0).normal(size=self.shape[0]).astype(self.dtype)
            top = 0.0
            for _ in range(20):
                y = self.op @ x
                top = float(np.linalg.norm(y) / np.linalg.norm(x))
                x = y / np.linalg.norm(y)
            self.scale = 0.95 / top
        return self.scale

    def _solve(self, b):
        if self.method == "cg":
            x, info = cg(self.op, b, rtol=self.rtol, atol=self.atol, maxiter=self.maxiter,
                         M=self.preconditioner, callback=self._count)
            return x, info != 0
        if self.method == "lsmr":
            result = lsmr(self.op, b, atol=self.rtol, btol=self.rtol, maxiter=self.maxiter)
            self.info[-1] = int(result[2])
            return result[0], result[1] not in (0, 1, 2)
        scale = self._neumann_scale()
        term = scale * b
        x = term.copy()
        for _ in range(self.terms - 1):
            term = term - scale * (self.op @ term)
            x += term
        self.info[-1] = self.terms
        return x, False

    def _count(self, _):
        self.info[-1] += 1

    def _matmat(self, X):
        B = check_vectors(X, self.shape[0], self.dtype)
        out = np.empty_like(B)
        self.info = []
        for j, b in enumerate(B):
            self.info.append(0)
            out[j], short = self._solve(b)
            if short:
                warnings.warn(f"InverseLinearOperator: {self.method} stopped short of its "
                              f"tolerance (rtol={self.rtol:g}) after {self.info[-1]} "
                              "iterations: raise maxiter, or precondition", RuntimeWarning,
                              stacklevel=3)
        return out.T

    def _adjoint(self):
        return self  # the operators it inverts are symmetric; see the class docstring
