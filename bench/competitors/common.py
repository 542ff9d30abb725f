"""What every competitor module shares: the timed operation, and comparable results."""

from typing import Callable, NamedTuple, Optional

#: operations whose result is an operator, not numbers to compare
UNCHECKED_OPS = {"GGN build", "Hessian build"}
#: the damping of the timed KFAC inverse, (KFAC + damping I)^-1: large enough for float32
#: (at 1e-3 curvlinops' float32 inverse differed from ghess's, eigendecomposed in float64, by
#: 0.2-1.5%; in float64 the two agree to 1e-8: tests/operators/test_curvlinops.py)
KFAC_DAMPING = 0.1


class Op(NamedTuple):
    """A timed operation: ``fn()`` computes it, ``to_numpy(fn())`` gives comparable numbers."""

    op: str
    fn: Callable
    to_numpy: Optional[Callable] = None
    note: Optional[str] = None  # how this implementation differs, for the report
    flops: Optional[float] = None  # counted flops of one call (ghess, PyTorch, XLA)
    flops_source: Optional[str] = None  # who counted them


class Unavailable(Exception):
    """A competitor cannot run here (not installed, or a layer it does not support)."""


def to_numpy(value):
    """Flat NumPy copy of a NumPy/torch/JAX result; a list of blocks is concatenated."""
    import numpy as np

    if isinstance(value, (list, tuple)):
        return np.concatenate([to_numpy(part) for part in value])
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu().numpy()
    return np.asarray(value).reshape(-1)


def loss_grad_to_numpy(result):
    """(loss, gradient) of any implementation; the gradient may come as blocks."""
    value, grad = result
    return float(value), to_numpy(grad)


def blocks_to_jacobians(blocks, n_samples, n_outputs):
    """Per-parameter Jacobian blocks (n, K, *shape), in theta's order, to (n, K, n_params).

    Returned flat, as :func:`to_numpy` returns ghess's (n, K, n_params) array.
    """
    import numpy as np

    return np.concatenate([to_numpy(b).reshape(n_samples, n_outputs, -1) for b in blocks],
                          axis=2).reshape(-1)
