"""One setup step for every entry point: model, loss, params, batches, scale, chunks, threads.

``loss_and_grad``, ``per_sample_jacobians``, ``ggn_diagonal``, the operators
and ``NewtonCG`` all check and resolve their arguments here, once, into a
:class:`Problem` that the engine and the operators' chunk loop take.
"""

import numbers
import os
import warnings

import numpy as np

from ._config import effective_threads, resolve_n_threads
from ._data import as_batches, as_input_batches
from ._distributed import check_agreement, check_comm, first_sample, rank_counts_or_raise
from ._engine.plan import plan_for
from ._validation import SUPPORTED_DTYPES, check_n_threads, check_params, check_positive_int
from .nn.base import Layer
from .nn.losses import Loss
from .nn.sequential import Sequential

__all__ = ["Problem", "check_model", "check_loss", "check_mode", "check_dtype",
           "check_memory_budget", "batch_sizes", "count_samples", "default_memory_budget",
           "format_bytes", "memory_limit", "MODES"]

MODES = ("auto", "stored", "recompute")


def check_model(model) -> Sequential:
    """Validate the model argument."""
    if not isinstance(model, Sequential):
        if isinstance(model, Layer):
            raise TypeError("model must be a ghess.Sequential; wrap the layer: "
                            "ghess.Sequential(layer, input_shape=...)")
        raise TypeError(f"model must be a ghess.Sequential, got {type(model).__name__}")
    if model.n_params == 0:
        raise ValueError("model has no parameters: nothing to differentiate")
    return model


def check_loss(loss) -> Loss:
    """Validate the loss argument."""
    if isinstance(loss, type) and issubclass(loss, Loss):
        raise TypeError(f"loss must be a loss instance, e.g. {loss.__name__}(), "
                        f"got the class {loss.__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a ghess loss (MSELoss, CrossEntropyLoss, "
                        f"BCEWithLogitsLoss), got {type(loss).__name__}")
    return loss


def check_mode(mode: str) -> str:
    """One of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_dtype(dtype) -> np.dtype:
    """float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def count_samples(data) -> int:
    """Count the samples of an int, an array X, ``(X, y)`` or a list of batches."""
    return sum(batch_sizes(data))


def batch_sizes(data) -> list[int]:
    """Return the samples per batch of an int (one batch), X, ``(X, y)`` or a list of batches."""
    if isinstance(data, numbers.Integral) and not isinstance(data, bool):
        if data < 1:
            raise ValueError(f"n_samples must be >= 1, got {data}")
        return [int(data)]
    if isinstance(data, np.ndarray):
        return [int(data.shape[0])]
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        return [int(np.shape(data[0])[0])]
    if isinstance(data, (list, tuple)):
        return [int(np.shape(X)[0]) for X, _ in data]
    raise TypeError("pass n_samples as an int, an array X, (X, y) or a list of (X, y) batches "
                    f"(not a one-shot iterable), got {type(data).__name__}")


def format_bytes(n: int) -> str:
    """Bytes in a readable unit."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def memory_limit() -> int:
    """Bytes this process may use: physical memory, within its RLIMIT_AS and cgroup limit."""
    try:
        limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    except (ValueError, OSError, AttributeError):
        limits = [8 << 30]
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    except (ImportError, OSError, ValueError):  # not on this platform
        pass
    limits.extend(_cgroup_memory_limits())
    return min(limits)


#: (mount point, limit file) of the cgroup memory controllers: v2 (unified, or the unified
#: part of a hybrid mount) and v1
_CGROUP_MOUNTS = (("/sys/fs/cgroup", "memory.max"),
                  ("/sys/fs/cgroup/unified", "memory.max"),
                  ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"))


def _cgroup_memory_limits(proc_cgroup="/proc/self/cgroup", mounts=_CGROUP_MOUNTS):
    """Return the memory limits of this process's cgroups: its own and its ancestors'.

    ``/proc/self/cgroup`` names the process's cgroup in each hierarchy (``0::/path`` for
    v2, ``N:memory:/path`` for v1's memory controller); a limit set on any cgroup from
    there up to the mount's root applies. In a container the path is usually ``/``: the
    mount's root is then the container's own cgroup.
    """
    paths = {"/"}
    try:
        with open(proc_cgroup) as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and (parts[1] == "" or "memory" in parts[1].split(",")):
                    paths.add(parts[2] or "/")
    except OSError:
        pass
    found = []
    for mount, name in mounts:
        for path in paths:
            directory = os.path.normpath(mount + "/" + path.strip("/"))
            while True:  # the cgroup and its ancestors, up to the mount
                value = _read_limit(os.path.join(directory, name))
                if value is not None:
                    found.append(value)
                if len(directory) <= len(mount):
                    break
                directory = os.path.dirname(directory)
    return found


def _read_limit(path):
    """Return a cgroup limit file's bytes, or None (absent, unreadable, "max": no limit)."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        return None
    if value.isdigit() and 0 < int(value) < (1 << 60):  # v1 writes ~2**63 for "none"
        return int(value)
    return None


def default_memory_budget() -> int:
    """Return a quarter of the memory this process may use (``memory_limit``), at most 4 GiB."""
    return int(min(4 << 30, memory_limit() // 4))


def check_memory_budget(memory_budget, stacklevel=4) -> int:
    """Validate an explicit budget (bytes > 0); warn when it exceeds what the process may use.

    A real number of bytes (``4e9``) is taken as the int below it.
    """
    if (isinstance(memory_budget, numbers.Real)
            and not isinstance(memory_budget, (bool, np.bool_, numbers.Integral))):
        if not np.isfinite(memory_budget) or memory_budget < 1:
            raise ValueError(f"memory_budget must be a finite number of bytes >= 1, got "
                             f"{memory_budget!r}")
        memory_budget = int(memory_budget)
    budget = check_positive_int(memory_budget, "memory_budget")
    limit = memory_limit()
    if budget > limit:
        warnings.warn(f"memory_budget of {format_bytes(budget)} exceeds the {format_bytes(limit)} "
                      "this process may use (physical memory, RLIMIT_AS, cgroup): stored mode "
                      "may run out of memory", RuntimeWarning, stacklevel=stacklevel)
    return budget


class Problem:
    """Checked and resolved arguments of one computation.

    Parameters
    ----------
    model : Sequential
    loss : Loss or None
        None for computations without targets (Jacobians); ``data`` is then the inputs X.
    params : array_like of shape (n_params,)
    data : (X, y), an iterable of (X, y), or X when ``loss`` is None
    chunk_size : int, optional
        Samples per chunk; by default the plan's rule for ``chunk_directions``
        directions (``Plan.chunk_size``).
    chunk_directions : int, default=1
        Directions pushed through a chunk at once (K for dense per-sample Jacobians).
    min_chunk : int, default=16
    n_threads : int, optional
    private : bool, default=False
        Keep private read-only copies of params and data: an operator's stored
        factors belong to THIS theta and data, whatever the caller later writes.
    check_deterministic : bool, default=True
        Read a re-iterable ``data`` (a DataLoader) twice and refuse it if the two
        passes differ.
    comm : mpi4py communicator, optional
        ``data`` is this rank's shard (possibly empty); the ranks must agree on
        the model, loss and parameters (checked, ``_distributed.check_agreement``),
        and a shard that fails validation on one rank raises on every rank.

    Attributes
    ----------
    params, dtype, lparams (per-layer views of params), batches, n_samples (this
    rank's), n_global (all ranks'), first_sample (the global index of this rank's
    first sample, ranks in order; 0 without comm), scale (the loss's reduction
    factor over all ranks' samples, 1 without a loss), chunk_size, n_threads (as
    given), omp_threads (resolved), plan, comm.
    """

    def __init__(self, model, loss, params, data, *, chunk_size=None, chunk_directions=1,
                 min_chunk=16, n_threads=None, private=False, check_deterministic=True,
                 comm=None):
        self.comm = check_comm(comm)
        self.model = check_model(model)
        self.loss = None if loss is None else check_loss(loss)
        try:
            params = check_params(params, model.n_params)
        except (ValueError, TypeError) as exc:
            if self.comm is None:
                raise
            check_agreement(self.comm, model, None, self.loss, exc)  # raises on every rank
        check_agreement(self.comm, model, params, self.loss)
        if private:
            params = params.copy()
            params.flags.writeable = False
        self.params = params
        self.dtype = params.dtype
        self.n_threads = check_n_threads(n_threads)
        self._omp_threads = resolve_n_threads(self.n_threads)
        chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
        self.plan = plan_for(model, self.dtype.itemsize)
        failure = None
        try:
            if loss is None:
                self.batches = as_input_batches(model, data, self.dtype, copy=private)
            else:
                self.batches = as_batches(model, loss, data, self.dtype, copy=private,
                                          check_deterministic=check_deterministic,
                                          allow_empty=self.comm is not None)
        except (ValueError, TypeError) as exc:
            if self.comm is None:
                raise
            failure = exc
        n_local = 0 if failure else self.batches.n_samples
        counts = rank_counts_or_raise(self.comm, n_local, failure)
        self.n_global = sum(counts)
        self.first_sample = first_sample(self.comm, counts)
        self.n_samples = n_local
        self.scale = 1.0 if loss is None else loss.scale(self.n_global, model.n_outputs)
        self.lparams = model.layer_params(self.params)
        self.chunk_size = (self.plan.chunk_size(chunk_directions, min_chunk, self._omp_threads,
                                                [X.shape[0] for X, _ in self.batches.batches])
                           if chunk_size is None else chunk_size)

    @property
    def omp_threads(self) -> int:
        """Threads for the kernels, resolved; 1 in a child forked after threaded use."""
        return effective_threads(self._omp_threads)

    def chunks(self):
        """Yield ``(X, y)`` chunks of at most ``chunk_size`` samples, in order."""
        return self.batches.chunks(self.chunk_size)
