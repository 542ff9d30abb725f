"""Shared base of the ghess ``LinearOperator`` classes.

Responsibilities: the ``LinearOperator`` contract (dtype and shape set, native
``_matmat``, ``matvec`` on ``(n,)``, ``(n, 1)`` and batched ``(k, n)``), vector
validation, thread control around products, memory planning (stored vs
recompute), and dense ``block``/``todense`` extraction.
"""

import numbers

import numpy as np
from scipy.sparse.linalg import LinearOperator

from . import _engine
from ._config import computing, resolve_n_threads
from ._validation import (
    SUPPORTED_DTYPES,
    all_finite,
    check_n_threads,
    check_nonnegative,
    check_params,
    check_positive_int,
)
from .conv import Conv2d
from .layers import Layer
from .model import Sequential

MODES = ("auto", "stored", "recompute")
#: directions per pass: the per-chunk temporaries grow with their number, and
#: past ~16 the GEMMs gain nothing more (measured on the digits CNN: a 100-column
#: matmat in one pass took 3x longer than in blocks of 16)
BLOCK_COLUMNS = 16


def format_bytes(n):
    """Bytes in a readable unit."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def default_memory_budget():
    """Return a quarter of physical memory, at most 4 GiB."""
    try:
        import os

        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return int(min(4 << 30, physical // 4))


#: temporaries of one chunk, in bytes: a dense-only network gets twice as many (below)
CHUNK_BYTES = 64 << 20


def default_chunk_size(model, itemsize, k=1, minimum=16):
    """Choose samples per chunk: about 64 MiB of temporaries for ``k`` directions.

    Dense layers want many samples per chunk (the chunk is a GEMM dimension),
    so a network without convolutions gets 128 MiB: MLP-M's float32 loss+grad,
    GGN and Hessian products ran 2-5% faster in one chunk of 1024 samples than
    in two of 512 (1 and 2 cores, interleaved timings), and its products
    1.03-1.1x faster with 420-512 samples than with 210-256. Convolutions
    already make per-sample GEMMs of their own, and want chunks whose unfolded
    inputs stay in cache: with 16 samples per chunk instead of 32, CNN-C's
    loss+grad ran 1.1-1.4x faster and its Hessian product 1.05-1.1x (float32
    and float64, 1 and 2 cores, interleaved timings). Per-sample Jacobians
    pull K directions back (k = K, minimum 4): CNN-S's and CNN-C's ran
    1.25-1.3x faster in chunks of 4-16 samples than of 256.
    """
    budget = CHUNK_BYTES
    if not any(isinstance(layer, Conv2d) for layer in model.layers):
        budget *= 2
    per_sample = _engine.working_bytes_per_sample(model, itemsize, k)
    return min(max(budget // max(per_sample, 1), minimum), 2048)


def check_model(model):
    """Validate the model argument."""
    if not isinstance(model, Sequential):
        if isinstance(model, Layer):
            raise TypeError("model must be a ghess.Sequential; wrap the layer: "
                            "ghess.Sequential(layer, input_shape=...)")
        raise TypeError(f"model must be a ghess.Sequential, got {type(model).__name__}")
    if model.n_params == 0:
        raise ValueError("model has no parameters: nothing to differentiate")
    return model


def check_loss(loss):
    """Validate the loss argument."""
    from .losses import Loss

    if isinstance(loss, type) and issubclass(loss, Loss):
        raise TypeError(f"loss must be a loss instance, e.g. {loss.__name__}(), "
                        f"got the class {loss.__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a ghess loss (MSELoss, CrossEntropyLoss, "
                        f"BCEWithLogitsLoss), got {type(loss).__name__}")
    return loss


def count_samples(data):
    """Count the samples of an int, an array X, ``(X, y)`` or a list of batches."""
    if isinstance(data, numbers.Integral) and not isinstance(data, bool):
        if data < 1:
            raise ValueError(f"n_samples must be >= 1, got {data}")
        return int(data)
    if isinstance(data, np.ndarray):
        return int(data.shape[0])
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        return int(np.shape(data[0])[0])
    if isinstance(data, (list, tuple)):
        return sum(int(np.shape(X)[0]) for X, _ in data)
    raise TypeError("pass n_samples as an int, an array X, (X, y) or a list of (X, y) batches "
                    f"(not a one-shot iterable), got {type(data).__name__}")


def check_mode(mode):
    """One of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class VectorOperatorMixin:
    """Validation and batching for products, shared by all ghess operators."""

    def _check_vectors(self, X, n, name="vector"):
        """Validate X of shape (n, k); return contiguous directions (k, n) in self.dtype."""
        X = np.asarray(X)
        if X.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be real (the operator's dtype is {self.dtype}), "
                            f"got dtype {X.dtype}")
        if X.ndim != 2 or X.shape[0] != n:
            raise ValueError(f"{name} must have {n} rows, got shape {X.shape}")
        V = np.ascontiguousarray(X.T, dtype=self.dtype)
        if not all_finite(V):
            raise ValueError(f"{name} contains NaN or Inf")
        return V

    def matvec(self, x):
        """Apply the operator to ``x`` of shape (n,), (n, 1), or batched (..., n)."""
        return self._vector_product(x, self.shape[1], self.shape[0], self.matmat,
                                    super().matvec)

    def rmatvec(self, x):
        """Apply the adjoint to ``x`` of shape (m,), (m, 1), or batched (..., m)."""
        return self._vector_product(x, self.shape[0], self.shape[1], self.rmatmat,
                                    super().rmatvec)

    @staticmethod
    def _vector_product(x, n, m, matmat, single):
        x = np.asanyarray(x)
        if x.ndim >= 2 and x.shape[-1] == n and not (x.ndim == 2 and x.shape == (n, 1)):
            y = matmat(x.reshape(-1, n).T).T
            return y.reshape(x.shape[:-1] + (m,))
        if x.shape not in ((n,), (n, 1)):
            raise ValueError(f"vector must have shape ({n},), ({n}, 1) or (k, {n}), "
                             f"got {x.shape}")
        return single(x)

    def _matvec(self, x):
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _rmatvec(self, x):
        return self._rmatmat(np.asarray(x).reshape(-1, 1)).reshape(-1)


class CurvatureOperator(VectorOperatorMixin, LinearOperator):
    """Base of the symmetric n_params x n_params curvature operators.

    Subclasses implement ``_prepare_stored`` and ``_apply_rows(V)`` (V of shape
    (k, n_params), returning the undamped product as (k, n_params)).
    """

    def __init__(self, model, loss, params, data, *, damping=0.0, mode="auto",
                 chunk_size=None, memory_budget=None, n_threads=None):
        from ._data import as_batches

        self.model = check_model(model)
        self.loss = check_loss(loss)
        # A private copy: the operator's stored factors belong to THIS theta.
        self.params = check_params(params, model.n_params).copy()
        self.params.flags.writeable = False
        self.damping = check_nonnegative(damping, "damping")
        self.n_threads = check_n_threads(n_threads)
        self._omp_threads = resolve_n_threads(self.n_threads)
        # private copies: the stored factors (and recompute passes) belong to THIS data
        self.data = as_batches(model, loss, data, self.params.dtype, copy=True)
        self.n_samples = self.data.n_samples
        self._scale = loss.scale(self.n_samples, model.n_outputs)
        self._lparams = model.layer_params(self.params)
        self.chunk_size = self._resolve_chunk_size(chunk_size)
        self.memory_budget = (default_memory_budget() if memory_budget is None
                              else check_positive_int(memory_budget, "memory_budget"))
        self.mode = self._resolve_mode(check_mode(mode), explicit_budget=memory_budget is not None)
        super().__init__(dtype=self.params.dtype, shape=(model.n_params, model.n_params))
        self._stored = None
        if self.mode == "stored":
            with computing():
                self._stored = self._prepare_stored()

    # -- planning -----------------------------------------------------------
    def _resolve_chunk_size(self, chunk_size):
        chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
        if chunk_size is None:
            chunk_size = default_chunk_size(self.model, self.params.itemsize)
        return chunk_size

    @classmethod
    def memory_required(cls, model, data, mode="stored", *, dtype=np.float64, chunk_size=None,
                        n_directions=1):
        """Bytes a mode needs for ``data`` (or ``n_samples``), before anything is allocated.

        ``"stored"``: the per-sample factors kept for all samples.
        ``"recompute"``: the temporaries of one pass over a chunk (``chunk_size``
        samples, by default the operator's own choice) for ``n_directions``
        directions at once (``matmat``, ``block`` and ``todense`` push up to
        16 through together).
        """
        check_model(model)
        mode = check_mode(mode)
        n = count_samples(data)
        dtype = np.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        itemsize = dtype.itemsize
        if mode == "recompute":
            chunk = min(n, default_chunk_size(model, itemsize) if chunk_size is None
                        else check_positive_int(chunk_size, "chunk_size"))
            k = check_positive_int(n_directions, "n_directions")
            return chunk * _engine.working_bytes_per_sample(model, itemsize, k)
        if mode == "auto":
            raise ValueError("memory_required needs mode 'stored' or 'recompute'")
        return n * cls._stored_bytes_per_sample(model, itemsize)

    def _resolve_mode(self, mode, explicit_budget):
        needed = self.memory_required(self.model, self.n_samples, "stored",
                                      dtype=self.params.dtype)
        self.stored_bytes = needed
        if mode == "auto":
            return "stored" if needed <= self.memory_budget else "recompute"
        if mode == "stored" and needed > self.memory_budget:
            raise ValueError(
                f"mode='stored' needs {format_bytes(needed)} for {self.n_samples} samples, "
                f"over the memory_budget of {format_bytes(self.memory_budget)}: "
                "raise memory_budget or use mode='recompute'")
        return mode

    @property
    def memory_bytes(self):
        """Bytes held by the stored factors (0 in recompute mode).

        Not counted: the operator's private copy of the data, the size of the data.
        """
        return 0 if self.mode == "recompute" else self.stored_bytes

    # -- products -----------------------------------------------------------
    def _matmat(self, X):
        V = self._check_vectors(X, self.shape[1])
        return self._apply_rows_damped(V).T

    def _rmatmat(self, X):
        return self._matmat(X)

    def _adjoint(self):
        return self

    def _transpose(self):
        return self

    def _apply_rows_damped(self, V):
        """Operator applied to the rows of V (k, n), BLOCK_COLUMNS rows per pass."""
        if V.shape[0] <= BLOCK_COLUMNS:
            with computing():
                out = self._apply_rows(V)
        else:
            out = np.empty_like(V)
            with computing():
                for start in range(0, V.shape[0], BLOCK_COLUMNS):
                    out[start:start + BLOCK_COLUMNS] = self._apply_rows(
                        V[start:start + BLOCK_COLUMNS])
        if self.damping:
            out += self.damping * V
        return out

    def block(self, name_a, name_b=None):
        """Dense block of the operator for two named parameters.

        Parameters
        ----------
        name_a, name_b : str
            Keys of ``model.param_slots`` such as ``"0.weight"``; ``name_b``
            defaults to ``name_a``.

        Returns
        -------
        ndarray of shape (size_a, size_b)
            Rows index ``name_a``'s entries, columns ``name_b``'s, each in C order
            of the parameter's shape; damping is included on the diagonal.
        """
        slot_a = self._slot(name_a)
        slot_b = self._slot(name_a if name_b is None else name_b)
        out = np.empty((slot_a.size, slot_b.size), dtype=self.dtype)
        for start in range(0, slot_b.size, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, slot_b.size)
            E = np.zeros((stop - start, self.shape[1]), dtype=self.dtype)
            E[np.arange(stop - start), slot_b.start + np.arange(start, stop)] = 1
            rows = self._apply_rows_damped(E)
            out[:, start:stop] = rows[:, slot_a.start:slot_a.stop].T
        return out

    def todense(self):
        """Return the full matrix (n_params x n_params); refuse above ``memory_budget``."""
        n = self.shape[0]
        if n * n * self.dtype.itemsize > self.memory_budget:
            raise ValueError(f"todense needs {format_bytes(n * n * self.dtype.itemsize)}, "
                             f"over the memory_budget of {format_bytes(self.memory_budget)}")
        out = np.empty((n, n), dtype=self.dtype)
        for start in range(0, n, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, n)
            E = np.zeros((stop - start, n), dtype=self.dtype)
            E[np.arange(stop - start), np.arange(start, stop)] = 1
            out[:, start:stop] = self._apply_rows_damped(E).T
        return out

    def _slot(self, name):
        try:
            return self.model.param_slots[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown parameter {name!r}; the model's parameters are "
                             f"{list(self.model.param_slots)}") from None

    def _new_output(self, k):
        return np.zeros((k, self.shape[1]), dtype=self.dtype)
