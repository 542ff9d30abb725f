"""Data handling: one batch ``(X, y)`` or an iterable of batches, cut into chunks."""

import numpy as np

from ._validation import as_array, is_tensor


def _is_array(x):
    return isinstance(x, np.ndarray) or is_tensor(x)


def _is_pair_of_arrays(item):
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(map(_is_array, item))


def _is_single_batch(data):
    # (X, y) is one batch, also with nested lists for X; ((X1, y1), (X2, y2)) and
    # ([X1, y1], [X2, y2]) are two
    return (isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple)
            and not (_is_pair_of_arrays(data[0]) and _is_pair_of_arrays(data[1])))


def _same_batches(first, second):
    """Whether two passes over a data iterable gave the same batches."""
    return len(first) == len(second) and all(
        len(a) == len(b) == 2 and all(np.array_equal(as_array(u), as_array(v))
                                      for u, v in zip(a, b))
        for a, b in zip(first, second))


class Batches:
    """Validated batches ``[(X, y), ...]`` in one compute dtype.

    ``y`` is None for data without targets (Jacobians). The whole iterable is
    consumed once, so generators work and recompute mode can pass over the data
    again for every product.
    """

    def __init__(self, batches, n_samples):
        self.batches = batches
        self.n_samples = n_samples

    def chunks(self, chunk_size):
        """Yield ``(X, y)`` views of at most ``chunk_size`` samples, in order.

        A batch is cut into as few chunks as fit and as even as possible (sizes
        differ by at most one): 1024 samples in chunks of at most 841 make two of
        512, not 841 and a small tail whose GEMMs run slower (docs/design.md).
        """
        for X, y in self.batches:
            n = X.shape[0]
            count = -(-n // chunk_size)
            for c in range(count):
                start, stop = c * n // count, (c + 1) * n // count
                yield X[start:stop], None if y is None else y[start:stop]


def as_batches(model, loss, data, dtype, copy=False, check_deterministic=True,
               allow_empty=False):
    """Validate ``data`` = ``(X, y)`` or an iterable of such, for ``model`` and ``loss``.

    The iterable may be a list, a generator or a re-iterable such as a
    ``torch.utils.data.DataLoader`` (tensors are taken as arrays). A re-iterable
    that is not a list or tuple is read twice and must give the same batches both
    times (``check_deterministic``): two computations on a shuffling loader
    would otherwise see different data. With ``copy``, the batches are private
    read-only copies: an operator that keeps them must not see later writes into
    the caller's buffers. ``allow_empty``: batches of 0 samples (of the right
    shape), and no batches at all, are accepted (a rank's shard of distributed data).
    """
    if isinstance(data, Batches):  # validated already (e.g. by NewtonCG); cast if needed
        batches = [(X.astype(dtype, copy=False), y if y is None or y.dtype.kind in "iu"
                    else y.astype(dtype, copy=False)) for X, y in data.batches]
        if copy:
            batches = [(_private(X), None if y is None else _private(y)) for X, y in batches]
        return Batches(batches, data.n_samples)
    if _is_single_batch(data):
        items = [data]
    else:
        if isinstance(data, np.ndarray) or not hasattr(data, "__iter__"):
            raise TypeError("data must be a tuple (X, y) or an iterable of (X, y) batches, "
                            f"got {type(data).__name__}")
        items = list(data)
        reiterable = not isinstance(data, (list, tuple)) and iter(data) is not data
        if check_deterministic and reiterable and not _same_batches(items, list(data)):
            raise ValueError(
                f"data ({type(data).__name__}) gave different batches on two passes (a "
                "shuffling DataLoader?): every pass over the data must be the same; use a "
                "loader without shuffling, or pass check_deterministic=False")
    if not items:
        if allow_empty:
            return Batches([], 0)
        raise ValueError("data is empty: got no batches")
    if (isinstance(data, list) and len(items) == 2
            and not any(isinstance(item, (tuple, list)) for item in items)):
        raise TypeError("data is a list of 2 items that are not (X, y) pairs: pass one batch "
                        "as a tuple (X, y), or batches as [(X1, y1), (X2, y2), ...]")
    batches = []
    n_samples = 0
    for i, item in enumerate(items):
        where = "" if len(items) == 1 else f" (batch {i})"
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"each batch must be a pair (X, y){where}, got "
                            f"{type(item).__name__}")
        X, y = item
        if allow_empty and np.ndim(X) >= 1 and np.shape(X)[0] == 0:
            if tuple(np.shape(X)[1:]) != tuple(model.input_shape):
                raise ValueError(f"X must have shape (n_samples, "
                                 f"{', '.join(map(str, model.input_shape))}), got "
                                 f"{np.shape(X)}{where}")
            continue  # an empty shard contributes nothing
        if y is None:
            raise TypeError(f"y is None{where}: {type(loss).__name__} needs targets for "
                            f"the {model.n_outputs} outputs")
        try:
            X = model.check_inputs(X, dtype)
            y = loss.check_targets(y, X.shape[0], model.n_outputs, dtype)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{exc}{where}") from None
        if copy:
            X, y = _private(X), _private(y)
        batches.append((X, y))
        n_samples += X.shape[0]
    return Batches(batches, n_samples)


def _private(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def as_input_batches(model, X, dtype, copy=False):
    """Validate inputs only (no targets), as one batch (a private copy with ``copy``)."""
    X = model.check_inputs(X, dtype)
    return Batches([(_private(X) if copy else X, None)], X.shape[0])
