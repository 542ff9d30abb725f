"""Input validation shared by the public API: dtypes, shapes, finiteness.

Python validates, Cython trusts: everything that reaches a kernel
went through here. Nothing here modifies its input; a converted copy is made
only when the dtype or memory layout requires one.
"""

import numbers
import os

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def compute_dtype(array_dtype):
    """float32 stays float32; other real numeric dtypes become float64."""
    dtype = np.dtype(array_dtype)
    if dtype.kind == "f" and dtype.itemsize == 4:  # any byte order
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def is_tensor(x):
    """Whether ``x`` is a PyTorch tensor (without importing PyTorch)."""
    return type(x).__module__.partition(".")[0] == "torch" and hasattr(x, "detach")


def as_array(x):
    """Return ``x`` as a NumPy array: a PyTorch tensor (any device, with or without grad)
    through ``detach().cpu().numpy()``, which shares a CPU tensor's memory; others by
    ``np.asarray``.
    """  # noqa: D205
    if is_tensor(x):
        return x.detach().cpu().resolve_conj().resolve_neg().numpy()
    return np.asarray(x)


def all_finite(a):
    """Whether every element of the float array ``a`` is finite.

    One pass without a temporary: a sum is finite only if every term is. A finite
    array whose sum overflows takes the exact elementwise check, which then passes
    (silently: the overflow or an Inf - Inf in the sum is not the caller's warning).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        total = a.sum()
    return bool(np.isfinite(total)) or bool(np.isfinite(a).all())


def as_float_array(x, name, *, dtype=None, ndim=None, allow_empty=True) -> np.ndarray:
    """Return ``x`` as a C-contiguous finite float array, without modifying it.

    Parameters
    ----------
    x : array_like
    name : str
        Used in error messages.
    dtype : dtype, optional
        Target dtype; by default float32 stays float32 and other real dtypes
        become float64.
    ndim : int, optional
        Required number of dimensions.
    """
    try:
        arr = as_array(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of real numbers, got {type(x).__name__}"
                        ) from exc
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers (float32 or float64), "
                        f"got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    target = compute_dtype(arr.dtype) if dtype is None else np.dtype(dtype)
    return cast_finite(arr, target, name)


def cast_finite(arr, target, name):
    """``arr`` as a contiguous array of ``target``; ValueError naming ``name`` unless finite.

    A value that is finite but overflows ``target`` in the cast (1e39 to float32) is
    reported as an overflow, not as NaN or Inf.
    """
    with np.errstate(over="ignore"):  # an overflow in the cast is reported below, by name
        out = np.ascontiguousarray(arr, dtype=target)
    if out.dtype.kind == "f" and not all_finite(out):
        bad = np.argwhere(~np.isfinite(out))[0]
        where = tuple(int(i) for i in bad)
        value = arr[where]
        if np.isfinite(value):  # finite before the cast: it overflowed the target dtype
            raise ValueError(f"{name} overflows {target}: {value} at index {where} exceeds "
                             f"its largest value {np.finfo(target).max:.4g}")
        raise ValueError(f"{name} contains NaN or Inf (first at index {where})")
    return out


def check_params(theta, n_params) -> np.ndarray:
    """Validate the flat parameter vector; return it (float32 or float64, contiguous)."""
    arr = as_array(theta) if not isinstance(theta, np.ndarray) else theta
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"params must be a 1-D float32 or float64 array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"params must be a flat 1-D array of length {n_params}, "
                         f"got shape {arr.shape}")
    if arr.shape[0] != n_params:
        raise ValueError(f"params must have length {n_params} (the model's n_params), "
                         f"got {arr.shape[0]}")
    return as_float_array(arr, "params")


def max_threads():
    """Return the most ``n_threads`` accepted: 4 threads per CPU of the machine.

    More would only oversubscribe the cores; far more exhausts the OpenMP
    runtime's thread creation, which ends the process.
    """
    return 4 * (os.cpu_count() or 1)


def check_n_threads(n_threads):
    """None means every core OpenMP sees; otherwise an int in [1, ``max_threads()``]."""
    if n_threads is None:
        return None
    if isinstance(n_threads, (bool, np.bool_)) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be a positive int or None, got {n_threads!r}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    if n_threads > max_threads():
        raise ValueError(f"n_threads must be at most {max_threads()} (4 per CPU of this "
                         f"machine), got {n_threads}")
    return int(n_threads)


def check_nonnegative(value, name):
    """Check a finite real number >= 0; return it as float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_damping(damping, n_params, dtype=np.float64, name="damping"):
    """Check a damping: a real number >= 0, or a finite (n_params,) array >= 0 (a diagonal).

    An array is returned as a private read-only copy in ``dtype``.
    """
    if isinstance(damping, numbers.Real) and not isinstance(damping, (bool, np.bool_)):
        return check_nonnegative(damping, name)
    arr = as_array(damping)
    if arr.dtype.kind not in "iuf" or arr.ndim != 1:
        raise TypeError(f"{name} must be a real number >= 0 or a 1-D array of length "
                        f"{n_params}, got {type(damping).__name__} of shape {arr.shape} and "
                        f"dtype {arr.dtype}")
    if arr.shape[0] != n_params:
        raise ValueError(f"{name} as an array must have length {n_params} (the model's "
                         f"n_params), got {arr.shape[0]}")
    if not (np.all(np.isfinite(arr)) and np.all(arr >= 0)):
        raise ValueError(f"{name} must be finite and >= 0 everywhere")
    out = np.array(arr, dtype=dtype)
    out.flags.writeable = False
    return out


def check_positive_int(value, name, *, allow_none=False):
    """Check a positive int (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_out(out, shape, dtype, name="out", inputs=()):
    """Validate a caller's output buffer: exact shape and dtype, C order, writeable.

    It must not share memory with any array in ``inputs`` (the result would then
    be computed from partly overwritten data).
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (the params' dtype), "
                        f"got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for other in inputs:
        if isinstance(other, np.ndarray) and np.shares_memory(out, other):
            raise ValueError(f"{name} shares memory with an input array")
    return out
