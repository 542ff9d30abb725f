"""The implementations ghess is compared with, one module each.

Each module's ``competitor(setup)`` returns ``{name: Op}``, its timed operations on
the problem's weights, data and vectors, or raises :class:`~.common.Unavailable`
when it cannot run here (PyTorch, JAX and curvlinops are optional). ghess comes
first: its results are the reference every other must match.
"""

import sys

from . import curvlinops_ops, ghess_ops, jax_jit, numpy_reference, pytorch

COMPETITORS = (("ghess", ghess_ops.competitor), ("numpy", numpy_reference.competitor),
               ("torch", pytorch.competitor), ("JAX", jax_jit.competitor),
               ("curvlinops", curvlinops_ops.competitor))


def competitor_versions():
    """Versions of the optional competitors this process imported."""
    from importlib import metadata

    versions = {}
    for label, module, dist in (("torch", "torch", "torch"), ("jax", "jax", "jax"),
                                ("jaxlib", "jaxlib", "jaxlib"),
                                ("curvlinops", "curvlinops", "curvlinops-for-pytorch")):
        if module in sys.modules:
            try:
                versions[label] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[label] = "unknown"
    return versions
