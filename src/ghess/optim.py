"""Subsampled Newton-CG training (Wang, Tan and Lin's method for CNNs).

Objective over the full training set of ``l`` samples::

    f(theta) = ||theta||^2 / (2 C) + L(theta),

with ``L`` the loss over all samples (``reduction="mean"`` gives Wang, Tan and
Lin's ``(1/l) sum_i xi(z_i; y_i)``). Each iteration:

1. draws a fresh subsample S and forms the Gauss-Newton matrix on it, scaled
   to estimate the full one: ``G_S = (l / |S|) GGN(L restricted to S)``, i.e.
   ``(1/|S|) sum_{i in S} J_i^T B_i J_i`` for the mean reduction;
2. solves ``((lambda + 1/C) I + G_S) d = -grad f`` by CG, stopping at
   ``||r|| <= cg_rtol ||grad f||`` or ``cg_maxiter`` iterations;
3. backtracks ``alpha`` (halving) until the Armijo condition
   ``f(theta + alpha d) - f(theta) <= armijo * alpha * grad f^T d`` holds;
4. updates the Levenberg-Marquardt damping from the ratio of the actual to the
   predicted reduction ``alpha grad f^T d + alpha^2 / 2 d^T (G_S + I/C) d``:
   ``lambda *= increase`` below ``ratio_low``, ``lambda *= decrease`` above
   ``ratio_high``.

The objective and gradient are accumulated in chunks, so the full data never
passes through the network at once.
"""

from __future__ import annotations

import numbers
import sys
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import numpy as np
import numpy.typing as npt
from scipy.sparse.linalg import LinearOperator, cg

from ._data import as_batches
from ._distributed import check_comm, global_count_or_raise
from ._engine.kfac import kronecker_layers
from ._problem import check_loss, check_mode, check_model
from ._progress import Progress
from ._typing import Data, Mode
from ._validation import (
    all_finite,
    as_array,
    check_damping,
    check_n_threads,
    check_params,
    check_positive_int,
)
from .analysis import ggn_diagonal
from .functional import loss_and_grad
from .nn.losses import CrossEntropyLoss, Loss
from .operators.ggn import GGNLinearOperator
from .operators.kfac import KFACLinearOperator

if TYPE_CHECKING:
    from .nn.sequential import Sequential

__all__ = ["NewtonCG", "StepRecord"]


class StepRecord(dict):
    """What one Newton-CG iteration did (a dict with attribute access).

    Keys: ``objective`` (f at the returned theta), ``grad_norm`` and ``grad_max``
    (the 2-norm and the largest absolute entry of grad f at the returned theta),
    ``cg_iterations``, ``damping`` (lambda used for this step), ``step_size``
    (alpha, 0 when rejected), ``accepted``, ``backtracks``, ``ratio`` (actual /
    predicted reduction), ``predicted_decrease`` (what the quadratic model promised for
    the full CG step: ``-(g.d + d.G d / 2)``, >= 0), ``time`` (seconds).
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:  # hasattr, copy and pickle expect AttributeError
            raise AttributeError(name) from None


def _add_note(exc, note):
    """Say where ``exc`` arose (PEP 678 notes, Python >= 3.11; unchanged before)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def _check_real(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_C(C, n_params):
    """C: a number > 0 or inf, or an (n_params,) array of them (inf: that entry unpenalised).

    Returns ``(C, 1/C)``, arrays as private read-only copies.
    """
    if isinstance(C, numbers.Real) and not isinstance(C, (bool, np.bool_)):
        if C == np.inf:
            return np.inf, 0.0
        C = _check_positive_real(C, "C")
        return C, 1.0 / C
    arr = as_array(C)
    if arr.dtype.kind not in "iuf" or arr.ndim != 1:
        raise TypeError(f"C must be a number > 0 or a 1-D array of length {n_params}, got "
                        f"{type(C).__name__} of shape {arr.shape} and dtype {arr.dtype}")
    if arr.shape[0] != n_params:
        raise ValueError(f"C as an array must have length {n_params} (the model's n_params), "
                         f"got {arr.shape[0]}")
    if np.any(np.isnan(arr)) or not np.all(arr > 0):
        raise ValueError("C must be > 0 everywhere (inf: no penalty on that entry)")
    C = np.array(arr, dtype=np.float64)
    l2 = 1.0 / C
    C.flags.writeable = l2.flags.writeable = False
    return C, l2


def _check_positive_real(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _check_iterate(x):
    """Raise FloatingPointError when CG hands the system a non-finite vector.

    CG's own arithmetic overflowed (its vectors are products of the gradient with the
    system): that is not the caller's input, as the operator's "contains NaN or Inf"
    would say.
    """
    x = np.asarray(x)
    if x.dtype.kind == "f" and not all_finite(x):
        raise FloatingPointError(
            f"the CG solve overflowed in {x.dtype}: an iterate is not finite (the gradient "
            "or the curvature is too large for the dtype; scale the data or the targets "
            "down, or use float64)")


class _ShiftedScaled(LinearOperator):
    """``scale * G + diag(shift)`` for a ghess GGN operator G (keeps its fast matmat).

    ``shift`` is a number or an (n,) array (a damping or L2 diagonal).
    """

    def __init__(self, G, scale, shift):
        # in G's dtype: a float64 diagonal would turn a float32 solve into float64
        self.G, self.scale, self.shift = G, scale, np.asarray(shift, dtype=G.dtype)
        super().__init__(dtype=G.dtype, shape=G.shape)

    def _matvec(self, x):
        _check_iterate(x)
        return self.scale * self.G.matvec(x) + self.shift * np.asarray(x).reshape(-1)

    def _matmat(self, X):
        _check_iterate(X)
        shift = self.shift[:, None] if self.shift.ndim else self.shift
        return self.scale * self.G.matmat(X) + shift * X

    def _adjoint(self):
        return self


class NewtonCG:
    """Subsampled Gauss-Newton with CG, Armijo line search and Levenberg-Marquardt damping.

    Parameters
    ----------
    model : Sequential
    loss : Loss
        Its reduction defines ``L``; ``"mean"`` is Wang, Tan and Lin's (1/l) sum.
    C : float or ndarray of shape (n_params,), default=1.0
        Regularisation: the objective adds ``||theta||^2 / (2 C)``; ``np.inf`` for none.
        An array penalises each entry by its own ``theta_i^2 / (2 C_i)``, ``inf``
        where unpenalised: scikit-learn's L2 on the weights only, for ``N``
        samples, is ``C = N / (alpha * model.parameter_mask("weight"))``.
    subsample : float or int, default=0.1
        Fraction of the data in (0, 1] or a number of samples in [1, l], drawn
        fresh every iteration, for the Gauss-Newton matrix.
    cg_rtol : float, default=0.1
        CG stops when ``||r|| <= cg_rtol * ||grad f||``.
    cg_maxiter : int, default=250
    damping : float or ndarray of shape (n_params,), default=1.0
        Initial Levenberg-Marquardt lambda (>= 0), or a diagonal of them; it grows
        and shrinks by ``increase`` and ``decrease`` as a whole.
    armijo : float, default=1e-4
        Sufficient-decrease constant of the line search.
    backtrack : float, default=0.5
        Step-size factor per backtracking step.
    max_backtracks : int, default=30
        After this many, the step is rejected and theta kept.
    max_rejections : int, default=10
        ``fit`` stops, with a warning, after this many rejected iterations in a row
        away from a minimiser (a gradient above sqrt(eps) times the objective).
    ratio_low, ratio_high : float, default=0.25, 0.75
    increase, decrease : float, default=1.5, 2/3
        Damping factors applied below ``ratio_low`` / above ``ratio_high``.
    chunk_size : int, optional
        Samples per pass for the objective and gradient; by default
        :func:`ghess.loss_and_grad`'s choice.
    mode : {"auto", "stored", "recompute"}, default="auto"
        Product mode of the subsampled GGN (see :class:`ghess.GGNLinearOperator`).
    n_threads : int, optional
    seed : int or numpy Generator, optional
        For the subsamples.
    preconditioner : {None, "diag", "kfac"}, default=None
        Preconditions CG on the damped system ``scale G_S + (lambda + 1/C) I``:
        ``"diag"`` with the inverse of its exact diagonal (``ggn_diagonal`` on the
        subsample), ``"kfac"`` with the inverse of ``scale KFAC(G_S) + d I``
        (:class:`ghess.KFACLinearOperator`, type-2, on the subsample; ``d`` the mean
        of the shift, exact for a scalar one; every parametrised layer must be
        Linear or Conv2d).
    preconditioner_every : int, default=1
        Iterations between rebuilds of the preconditioner's factors (the
        diagonal, or KFAC's Kronecker factors); in between, the kept factors
        serve with the current damping.
    comm : mpi4py communicator, optional
        Wang, Tan and Lin's subsampled Newton, distributed: ``data`` is this
        rank's shard, the objective, gradient and Gauss-Newton products are the
        whole data's (bit-identical on every rank, see
        :class:`ghess.GGNLinearOperator`), and each rank draws its part of the
        subsample from its own shard with its own stream (``seed`` spawned per
        rank): every rank ends each iteration with the same parameters.
        ``subsample`` as a fraction applies to every shard; as a count, it is
        shared in proportion to the shards. A preconditioner is built from every
        rank's part of the subsample, the same on every rank.

    Attributes
    ----------
    theta_ : ndarray
        After :meth:`fit`, also one ended by an exception (a callback's included):
        the last accepted parameters.
    history_ : list of StepRecord
        The iterations of the last :meth:`fit`. After an exception, the random
        state and damping are those after the last complete iteration, so
        ``fit(opt.theta_, ...)`` continues the same trajectory.

    Examples
    --------
    >>> import numpy as np, ghess
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5)); y = (X[:, 0] > 0).astype(int)
    >>> model = ghess.Sequential(ghess.Linear(5, 2), input_shape=(5,))
    >>> opt = ghess.NewtonCG(model, ghess.CrossEntropyLoss(), C=10.0, subsample=0.5, seed=0)
    >>> theta, history = opt.fit(model.init_params(), (X, y), n_iterations=5, verbose=False)
    >>> bool(history[-1].objective < history[0].objective)
    True
    """

    def __init__(self, model: Sequential, loss: Loss, *, C: float | npt.ArrayLike = 1.0,
                 subsample: float | numbers.Real = 0.1, cg_rtol: float = 0.1,
                 cg_maxiter: int = 250, damping: float = 1.0, armijo: float = 1e-4,
                 backtrack: float = 0.5, max_backtracks: int = 30, max_rejections: int = 10,
                 ratio_low: float = 0.25,
                 ratio_high: float = 0.75, increase: float = 1.5, decrease: float = 2 / 3,
                 chunk_size: int | None = None, mode: Mode = "auto",
                 n_threads: int | None = None,
                 seed: int | np.random.Generator | None = None,
                 preconditioner: str | None = None, preconditioner_every: int = 1,
                 comm=None) -> None:
        self.model = check_model(model)
        self.loss = check_loss(loss)
        self.C, self._l2 = _check_C(C, self.model.n_params)  # 1/C: 0 where no L2 term
        if isinstance(subsample, (bool, np.bool_)) or not isinstance(subsample, numbers.Real):
            raise TypeError(f"subsample must be a fraction in (0, 1] or a sample count, "
                            f"got {subsample!r}")
        if isinstance(subsample, numbers.Integral):
            if subsample < 1:
                raise ValueError(f"subsample must be a count >= 1 or a fraction in (0, 1], "
                                 f"got {subsample}")
        elif not 0 < subsample <= 1:
            raise ValueError(f"subsample as a fraction must lie in (0, 1], got {subsample}")
        self.subsample = subsample
        self.cg_rtol = _check_positive_real(cg_rtol, "cg_rtol")
        self.cg_maxiter = check_positive_int(cg_maxiter, "cg_maxiter")
        self.damping = check_damping(damping, self.model.n_params)
        self.armijo = _check_positive_real(armijo, "armijo")
        self.backtrack = _check_positive_real(backtrack, "backtrack")
        if not (self.armijo < 1 and self.backtrack < 1):
            raise ValueError("armijo and backtrack must lie in (0, 1)")
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")
        self.max_rejections = check_positive_int(max_rejections, "max_rejections")
        self.ratio_low = _check_real(ratio_low, "ratio_low")
        self.ratio_high = _check_real(ratio_high, "ratio_high")
        if not self.ratio_low < self.ratio_high:
            raise ValueError(f"need ratio_low < ratio_high, got {ratio_low}, {ratio_high}")
        self.increase = _check_positive_real(increase, "increase")
        self.decrease = _check_positive_real(decrease, "decrease")
        if self.increase < 1 or self.decrease > 1:
            raise ValueError(f"need increase >= 1 and decrease <= 1 (lambda grows when the "
                             f"model predicts badly), got increase={increase}, "
                             f"decrease={decrease}")
        self.chunk_size = (None if chunk_size is None
                           else check_positive_int(chunk_size, "chunk_size"))
        self.mode = check_mode(mode)
        self.n_threads = check_n_threads(n_threads)
        self.comm = check_comm(comm)
        if self.comm is not None and self.comm.Get_size() > 1:
            if isinstance(seed, np.random.Generator):
                raise TypeError("with comm, seed must be an int or None: each rank spawns "
                                "its own stream from it")
            if seed is None:  # one seed for all, broadcast: the ranks' streams then differ
                seed = self.comm.bcast(int(np.random.SeedSequence().entropy) % 2**63, root=0)
            seed = np.random.SeedSequence(seed).spawn(self.comm.Get_size())[
                self.comm.Get_rank()]
        self.rng = np.random.default_rng(seed)
        if preconditioner not in (None, "diag", "kfac"):
            raise ValueError(f"preconditioner must be None, 'diag' or 'kfac', got "
                             f"{preconditioner!r}")
        if preconditioner == "kfac":
            kronecker_layers(self.model)  # a layer KFAC cannot factor: refused now
        self.preconditioner = preconditioner
        self.preconditioner_every = check_positive_int(preconditioner_every,
                                                       "preconditioner_every")
        self._preconditioner_state = None  # (factors, iterations they have served)

    # -- objective --------------------------------------------------------
    def objective(self, theta: np.ndarray, data: Data) -> tuple[float, np.ndarray]:
        """Return ``(f, grad f)`` over all of ``data``, accumulated in chunks."""
        value, grad = loss_and_grad(self.model, self.loss, theta, data,
                                    chunk_size=self.chunk_size, n_threads=self.n_threads,
                                    comm=self.comm)
        l2 = self._l2 if np.isscalar(self._l2) else self._l2.astype(grad.dtype, copy=False)
        return value + 0.5 * float(theta @ (l2 * theta)), grad + l2 * theta

    def _prepare(self, theta, data):
        theta = check_params(theta, self.model.n_params).copy()
        n_global = None
        if self.comm is not None and not hasattr(data, "batches"):
            # a bad shard on one rank raises on every rank (with the sample count)
            failure = None
            try:
                data = as_batches(self.model, self.loss, data, theta.dtype, allow_empty=True)
            except (ValueError, TypeError) as exc:
                failure = exc
            n_global = global_count_or_raise(self.comm, 0 if failure else data.n_samples,
                                             failure)
        batches = data if hasattr(data, "batches") else as_batches(
            self.model, self.loss, data, theta.dtype)
        n = batches.n_samples
        if self.comm is None:
            size = (self.subsample if isinstance(self.subsample, numbers.Integral)
                    else max(1, int(round(self.subsample * n))))
            if size > n:
                raise ValueError(f"subsample of {size} samples exceeds the {n} samples of "
                                 "data")
            self._counts = (n, size)
            return theta, batches, size
        # distributed: this rank's share of the subsample, from its own shard
        if n_global is None:  # batches validated already: only their count to share
            n_global = int(self.comm.allreduce(n))
        if isinstance(self.subsample, numbers.Integral):
            if self.subsample > n_global:
                raise ValueError(f"subsample of {self.subsample} samples exceeds the "
                                 f"{n_global} samples of data (all ranks)")
            size = int(round(self.subsample * n / n_global))
        else:
            size = max(1, int(round(self.subsample * n))) if n else 0
        self._counts = (n_global, int(self.comm.allreduce(size)))
        if self._counts[1] == 0:
            raise ValueError(f"subsample={self.subsample} gives every rank a share of 0 "
                             "samples: ask for more")
        return theta, batches, min(size, n)

    def _subsample(self, batches, size):
        if size == 0:  # a rank whose shard is empty (or too small for a share)
            dtype = batches.batches[0][0].dtype if batches.batches else np.float64
            return (np.empty((0,) + tuple(self.model.input_shape), dtype=dtype),
                    self.loss.example_targets(0, self.model.n_outputs, dtype))
        index = np.sort(self.rng.choice(batches.n_samples, size=size, replace=False))
        if len(batches.batches) == 1:
            X, y = batches.batches[0]
            return X[index], y[index]
        X = np.concatenate([b[0] for b in batches.batches])
        y = np.concatenate([b[1] for b in batches.batches])
        return X[index], y[index]

    # -- one iteration ----------------------------------------------------
    def step(self, theta: npt.ArrayLike, data: Data, *,
             _state: list | None = None) -> tuple[np.ndarray, StepRecord]:
        """Take one Newton-CG iteration from ``theta``.

        Returns
        -------
        theta : ndarray
            The new parameters (a new array; ``theta`` itself is not modified),
            or a copy of ``theta`` when no step was accepted.
        record : StepRecord
        """
        self._stage = "the objective at theta"
        try:
            return self._step(theta, data, _state)
        except Exception as exc:
            _add_note(exc, f"(Newton-CG, stage: {self._stage})")
            raise

    def _step(self, theta, data, _state):
        """Run the body of :meth:`step`; ``self._stage`` names the stage being run."""
        start = time.perf_counter()
        if _state is None:
            theta, batches, size = self._prepare(theta, data)
            value, grad = self.objective(theta, batches)
        else:
            theta, batches, size, value, grad = _state
        lam = self.damping
        self._stage = "the Gauss-Newton operator on the subsample"
        X_s, y_s = self._subsample(batches, size)
        G = GGNLinearOperator(self.model, self.loss, theta, (X_s, y_s), mode=self.mode,
                              comm=self.comm,
                              n_threads=self.n_threads)
        # G on S uses S's own normaliser for "mean"; rescale to estimate the full GGN
        n_all, size_all = self._counts  # over every rank, with comm
        scale = (n_all / size_all if self.loss.reduction == "sum" else 1.0)
        system = _ShiftedScaled(G, scale, lam + self._l2)
        iterations = [0]

        def count(_):
            iterations[0] += 1

        M = self._cg_preconditioner(theta, (X_s, y_s), scale, lam + self._l2)
        self._stage = "the CG solve"
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            direction, _ = cg(system, -grad, rtol=self.cg_rtol, maxiter=self.cg_maxiter,
                              M=M, callback=count)
            slope = float(grad @ direction)
            # CG's first step is a positive multiple of -grad, a descent direction, unless
            # its arithmetic overflows (SciPy then returns zeros) or |grad|^2 underflows
            breakdown = not slope < 0 and float(grad @ grad) > 0
        _check_iterate(direction)
        if not np.isfinite(slope) or breakdown:
            raise FloatingPointError(
                f"the CG solve overflowed in {theta.dtype}: the slope of its direction along "
                f"the gradient is {slope} (gradient norm {float(np.linalg.norm(grad)):.3g}, "
                f"objective {value:.3g}); scale the data or the targets down, or use float64")
        curvature = float(direction @ (scale * (G @ direction) + self._l2 * direction))
        alpha, accepted, backtracks = 1.0, False, 0
        new_theta, new_value, new_grad = theta, value, grad
        self._stage = "the line search"
        if slope < 0:
            for backtracks in range(self.max_backtracks + 1):
                candidate = theta + alpha * direction
                try:
                    cand_value, cand_grad = self.objective(candidate, batches)
                except FloatingPointError:  # the step overflowed: reject it, step shorter
                    cand_value, cand_grad = np.inf, None
                if cand_value - value <= self.armijo * alpha * slope:
                    accepted = True
                    new_theta, new_value, new_grad = candidate, cand_value, cand_grad
                    break
                alpha *= self.backtrack
        predicted = alpha * slope + 0.5 * alpha ** 2 * curvature
        ratio = (new_value - value) / predicted if accepted and predicted < 0 else 0.0
        if ratio < self.ratio_low:
            self.damping = lam * self.increase
        elif ratio > self.ratio_high:
            self.damping = lam * self.decrease
        record = StepRecord(
            objective=new_value, grad_norm=float(np.linalg.norm(new_grad)),
            grad_max=float(np.max(np.abs(new_grad))),
            cg_iterations=iterations[0], damping=lam, step_size=alpha if accepted else 0.0,
            accepted=accepted, backtracks=backtracks, ratio=ratio,
            predicted_decrease=max(0.0, -(slope + 0.5 * curvature)),
            time=time.perf_counter() - start)
        if _state is not None:
            _state[3], _state[4] = new_value, new_grad
        return new_theta.copy() if not accepted else new_theta, record

    # -- a training run ---------------------------------------------------
    def _cg_preconditioner(self, theta, subsample, scale, shift):
        """Return CG's preconditioner for ``scale G_S + diag(shift)``, or None.

        The factors (the GGN diagonal, or KFAC) are rebuilt on this iteration's
        subsample every ``preconditioner_every`` iterations; the damping is
        always the current one.
        """
        if self.preconditioner is None:
            return None
        factors, served = self._preconditioner_state or (None, self.preconditioner_every)
        if served >= self.preconditioner_every:
            self._stage = f"the {self.preconditioner} preconditioner"
            if self.preconditioner == "kfac":
                factors = KFACLinearOperator(self.model, self.loss, theta, subsample,
                                             n_threads=self.n_threads, comm=self.comm)
            else:
                factors = ggn_diagonal(self.model, self.loss, theta, subsample,
                                       n_threads=self.n_threads, comm=self.comm)
            served = 0
        self._preconditioner_state = (factors, served + 1)
        # in theta's dtype: a float64 preconditioner would turn a float32 solve into float64
        if self.preconditioner == "diag":
            inverse = (1.0 / (scale * factors + shift)).astype(theta.dtype)
            return LinearOperator(theta.shape * 2, dtype=theta.dtype,
                                  matvec=lambda x: inverse * np.ravel(x))
        # (scale K + d I)^-1 = (K + d/scale I)^-1 / scale, the damping kept above the
        # rounding of the factors' largest eigenvalue product
        top = max(la.max() * lb.max() for (la, _), (lb, _) in
                  factors.eigendecompositions().values())
        d = max(float(np.mean(shift)) / scale, 1e-10 * top, np.finfo(np.float64).tiny)
        inverse, factor = factors.inverse(d), theta.dtype.type(1.0 / scale)
        return LinearOperator(theta.shape * 2, dtype=theta.dtype,
                              matvec=lambda x: factor * inverse.matvec(x))

    def fit(self, theta: npt.ArrayLike, data: Data, n_iterations: int = 20, *,
            validation: Data | None = None, verbose: bool = True,
            callback: Callable[[np.ndarray, StepRecord], bool | None] | None = None,
            file: TextIO | None = None,
            progress: bool = False) -> tuple[np.ndarray, list[StepRecord]]:
        """Run ``n_iterations`` Newton-CG iterations; return ``(theta, history)``.

        Prints one line per iteration when ``verbose`` (to ``file``, default
        stdout), with the validation accuracy or loss when ``validation=(X, y)``
        is given. ``callback(theta, record)`` may return True to stop early.
        ``progress=True`` shows the iterations (a tqdm bar where installed, else a
        text line on stderr). A KeyboardInterrupt stops the run and returns the
        last ACCEPTED theta. With ``comm``, only rank 0 prints and shows progress,
        and a callback that returns True on any rank stops every rank after the
        same iteration.
        """
        n_iterations = check_positive_int(n_iterations, "n_iterations")
        if self.comm is not None and self.comm.Get_rank() != 0:
            verbose = progress = False  # rank 0 reports for all: they take the same steps
        theta, batches, size = self._prepare(theta, data)
        if validation is not None:
            validation = as_batches(self.model, self.loss, validation, theta.dtype,
                                    allow_empty=self.comm is not None)
        out = sys.stdout if file is None else file
        try:
            value, grad = self.objective(theta, batches)
        except FloatingPointError as exc:
            _add_note(exc, "(Newton-CG: the objective at the initial parameters)")
            raise
        state = [theta, batches, size, value, grad]
        history = []
        # what an interrupted fit leaves on the optimizer: the last accepted theta, the
        # iterations done, and the random state and damping after the last complete one,
        # so that fit(opt.theta_, ...) resumes on the uninterrupted trajectory
        self.theta_, self.history_ = theta, history
        saved = (self.rng.bit_generator.state, self.damping, self._preconditioner_state)
        rejected = 0
        if verbose:
            print(f"{'iter':>4} {'objective':>12} {'|grad|':>9} {'CG':>4} {'lambda':>9} "
                  f"{'step':>6} {'time':>7}" + ("  validation" if validation else ""),
                  file=out, flush=True)
        report = Progress(n_iterations, "Newton-CG", progress)
        try:
            for it in range(n_iterations):
                new_theta, record = self.step(theta, None, _state=state)
                report.update(1)
                theta = new_theta
                state[0] = self.theta_ = theta
                history.append(record)
                saved = (self.rng.bit_generator.state, self.damping,
                         self._preconditioner_state)
                if validation is not None:
                    record["validation"] = self.evaluate(theta, validation)
                if verbose:
                    print(f"{it:4d} {record.objective:12.6g} {record.grad_norm:9.3g} "
                          f"{record.cg_iterations:4d} {np.max(record.damping):9.3g} "
                          f"{record.step_size:6.3g} {record.time:6.2f}s"
                          + (f"  {record['validation']:.4f}" if validation else ""),
                          file=out, flush=True)
                stop = callback is not None and bool(callback(theta, record))
                if self.comm is not None:  # one rank's stop stops all, in the same iteration
                    stop = int(self.comm.allreduce(int(stop))) > 0
                if stop:
                    break
                rejected = 0 if record.accepted else rejected + 1
                # at a minimiser no step decreases f either: rejections are convergence
                # when the decrease the model predicts is below the rounding of f
                converged = record.predicted_decrease <= 16 * np.finfo(theta.dtype).eps * max(
                    1.0, abs(record.objective))
                if rejected >= self.max_rejections and not converged:
                    warnings.warn(
                        f"Newton-CG stopped after iteration {it}: {rejected} iterations in a "
                        f"row found no step that decreases the objective (damping grew to "
                        f"{np.max(self.damping):.3g}); theta is the last accepted one",
                        RuntimeWarning,
                        stacklevel=2)
                    break
        except KeyboardInterrupt:
            (self.rng.bit_generator.state, self.damping,
             self._preconditioner_state) = saved
            if verbose:
                print("interrupted: returning the last accepted parameters", file=out)
        except Exception as exc:
            (self.rng.bit_generator.state, self.damping,
             self._preconditioner_state) = saved
            _add_note(exc, f"(in Newton-CG iteration {len(history)}; opt.theta_ holds the last "
                           f"accepted parameters and opt.history_ the {len(history)} iterations "
                           "done: fit(opt.theta_, ...) resumes)")
            raise
        finally:
            report.close()
        return theta, history

    def evaluate(self, theta: npt.ArrayLike, data: Data) -> float:
        """Accuracy for CrossEntropyLoss, else the loss value, on ``data``."""
        batches = data if hasattr(data, "batches") else as_batches(
            self.model, self.loss, data, np.asarray(theta).dtype,
            allow_empty=self.comm is not None)
        if isinstance(self.loss, CrossEntropyLoss):
            correct = sum(int((self.model.forward(theta, X, n_threads=self.n_threads)
                               .argmax(axis=1) == y).sum()) for X, y in batches.batches)
            if self.comm is not None:  # every rank's shard (exact integer sums)
                correct = int(self.comm.allreduce(correct))
                return correct / int(self.comm.allreduce(batches.n_samples))
            return correct / batches.n_samples
        return loss_and_grad(self.model, self.loss, theta, batches, n_threads=self.n_threads,
                             comm=self.comm)[0]
