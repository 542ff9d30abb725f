"""KFAC's Kronecker factors, accumulated over one chunk in one forward and one backward pass.

For a Linear or Conv2d layer with inputs a and output gradients g, KFAC
approximates the layer's block of the GGN (or Fisher) by ``B (x) A`` with
``A ~ sum a a^T`` (the inputs' second moment; per pixel for a convolution, KFC)
and ``B ~ sum g g^T`` (the output gradients', back-propagated from the output
columns S of each sample: ``S S^T`` is the loss Hessian for the type-2 Fisher,
the outer product of sampled gradients for the Monte-Carlo Fisher, of the true
gradient for the empirical one). The chunk runs forward once and pulls its m
columns back through the network once, as the stored factors are built; each
Kronecker layer adds ``a^T a`` and ``g^T g`` with one GEMM each.
"""

import numpy as np

from .._kernels import dense
from .passes import checked_forward
from .plan import plan_for

__all__ = ["kronecker_layers", "kfac_chunk"]


def kronecker_layers(model):
    """Return the parametrised layers' indices; ValueError for one without Kronecker factors."""
    layers = []
    for i in plan_for(model, 8).param_layers:
        layer = model.layers[i]
        if not layer.has_kronecker_factors:
            raise ValueError(
                f"KFAC has Kronecker factors for Linear and Conv2d layers only; layer {i} "
                f"({type(layer).__name__}) has parameters but none (freeze it, or use the "
                "exact GGNLinearOperator or EmpiricalFisherLinearOperator)")
        layers.append(i)
    return layers


def _add_gram_with_ones(rows, out, n_threads):
    """Add [rows, 1]^T [rows, 1] to out: the input factor of a layer whose bias joins in."""
    d = rows.shape[1]
    block = np.empty((d, d), dtype=rows.dtype)
    dense.gemm_rowmajor(True, False, 1.0, rows, rows, 0.0, block, n_threads)
    out[:d, :d] += block
    sums = rows.sum(axis=0)
    out[:d, d] += sums
    out[d, :d] += sums
    out[d, d] += rows.shape[0]


def kfac_chunk(model, lparams, layers, X, columns, approx, joint, A, B, n_threads):
    """Add one chunk's Kronecker-factor sums into ``A`` and ``B`` (dicts by layer index).

    ``columns(z)`` returns the output columns (n, m, K) for the outputs z.
    ``joint``: layers whose bias joins the weight (a ones column in their input rows).
    """
    ctxs, z = checked_forward(model, lparams, X, 1, n_threads)
    g = np.ascontiguousarray(columns(z))
    first = plan_for(model, X.dtype.itemsize).first
    wanted = set(layers)
    for i in range(len(model.layers) - 1, first - 1, -1):
        layer = model.layers[i]
        if i in wanted:
            rows = layer.kfac_input_rows(ctxs[i], approx, n_threads)
            if i in joint:
                _add_gram_with_ones(np.ascontiguousarray(rows), A[i], n_threads)
            else:
                dense.gemm_rowmajor(True, False, 1.0, np.ascontiguousarray(rows),
                                    np.ascontiguousarray(rows), 1.0, A[i], n_threads)
            grows = np.ascontiguousarray(layer.kfac_output_rows(g, approx))
            dense.gemm_rowmajor(True, False, 1.0, grows, grows, 1.0, B[i], n_threads)
        if i > first:
            g = layer.vjp(lparams[i], ctxs[i], g, None, True, n_threads)
