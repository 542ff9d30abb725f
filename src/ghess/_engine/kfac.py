"""KFAC's Kronecker factors, accumulated over one chunk in one forward and one backward pass.

For a Linear or Conv2d layer with inputs a and output gradients g, KFAC
approximates the layer's block of the GGN (or Fisher) by ``B (x) A`` with
``A ~ sum a a^T`` (the inputs' second moment; per pixel for a convolution, KFC)
and ``B ~ sum g g^T`` (the output gradients', back-propagated from the output
columns S of each sample: ``S S^T`` is the loss Hessian for the type-2 Fisher,
the outer product of sampled gradients for the Monte-Carlo Fisher, of the true
gradient for the empirical one). The chunk runs forward once and pulls its m
columns back through the network once, as the stored factors are built; each
Kronecker layer adds its Gram sums by SYRK (``dense.gram_sum``) straight from the
layout the passes keep: a convolution's patches per sample and its gradients per
channel and pixel, with no transposed copy.
"""

import numpy as np

from .._kernels import dense
from .factors import step_context
from .passes import checked_forward
from .plan import path_steps, plan_for

__all__ = ["kronecker_layers", "kfac_chunk", "ekfac_chunk"]


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


def _add_gram(operand, out, n_threads, with_ones=False):
    """Add the Gram sum of a layer's ``(X, transpose)`` operand into ``out``.

    ``with_ones``: as if every vector had a 1 appended (a bias that joins the
    weight): the last row and column get the vectors' sums and count.
    """
    X, transpose = operand
    X = np.ascontiguousarray(X)
    d = X.shape[2] if transpose else X.shape[1]
    if not with_ones:
        dense.gram_sum(X, transpose, out, n_threads)
        return
    block = np.zeros((d, d), dtype=X.dtype)
    dense.gram_sum(X, transpose, block, n_threads)
    out[:d, :d] += block
    sums = X.sum(axis=(0, 1)) if transpose else X.sum(axis=(0, 2))
    out[:d, d] += sums
    out[d, :d] += sums
    out[d, d] += X.shape[0] * (X.shape[1] if transpose else X.shape[2])


def _layer_gradients(model, lparams, layers, X, columns, n_threads):
    """Yield ``(i, context, g)`` for each of ``layers``, last first: one forward pass, then
    the output columns (n, m, K) pulled back, g being the gradient at layer i's output."""  # noqa: D205, D209
    ctxs, z = checked_forward(model, lparams, X, 1, n_threads)
    g = np.ascontiguousarray(columns(z))
    first = plan_for(model, X.dtype.itemsize).first
    wanted = set(layers)
    # an activation and the max-pooling after it pull g back in one pass (ActivationMaxPool)
    steps = path_steps(model, tuple(range(first, len(model.layers))))
    for step, indices in reversed(steps):
        i = indices[0]
        if i in wanted:
            yield i, ctxs[i], g
        if i > first:
            g = step.vjp(lparams[i], step_context(step, indices, ctxs, n_threads), g, None,
                         True, n_threads)


def kfac_chunk(model, lparams, layers, X, columns, approx, joint, A, B, n_threads):
    """Add one chunk's Kronecker-factor sums into ``A`` and ``B`` (dicts by layer index).

    ``columns(z)`` returns the output columns (n, m, K) for the outputs z.
    ``joint``: layers whose bias joins the weight (a ones entry in their inputs).
    """
    for i, ctx, g in _layer_gradients(model, lparams, layers, X, columns, n_threads):
        layer = model.layers[i]
        _add_gram(layer.kfac_inputs(ctx, approx, n_threads), A[i], n_threads, i in joint)
        _add_gram(layer.kfac_output_grads(g, approx), B[i], n_threads)


def ekfac_chunk(model, lparams, layers, X, columns, joint, bases, E, n_threads):
    """Add one chunk's EKFAC eigenvalue corrections into ``E`` (dicts by layer index).

    ``bases[i]`` is ``(Q_A, Q_B)`` of layer i; ``E[i]`` is ``{"weight": (n_out, d_in),
    "bias": (n_out,)}`` or, for a joint bias, ``{"weight": (n_out, d_in + 1)}``. Each
    sample's gradient for column c, ``G = g a^T`` summed over the positions, is
    rotated into the Kronecker eigenbasis, ``Q_B^T G Q_A``, and its squares summed.
    """
    for i, ctx, g in _layer_gradients(model, lparams, layers, X, columns, n_threads):
        a, gs = model.layers[i].kfac_sample_operands(ctx, g, n_threads)
        Qa, Qb = bases[i]
        if i in joint:  # the ones of the bias, at every position
            a = np.concatenate([a, np.ones((a.shape[0], 1, a.shape[2]), a.dtype)], axis=1)
        g_rot = np.matmul(Qb.T, gs)  # (n, m, n_out, T)
        a_rot = np.matmul(Qa.T, a)  # (n, d_in, T)
        if a.shape[2] == 1:  # no sharing: (Q_B^T g)^2 (x) (Q_A^T a)^2, one GEMM
            E[i]["weight"] += (g_rot[..., 0] ** 2).sum(axis=1).T @ (a_rot[..., 0] ** 2)
        else:
            G = np.matmul(g_rot, a_rot[:, None].transpose(0, 1, 3, 2))
            E[i]["weight"] += (G * G).sum(axis=(0, 1))
        if "bias" in E[i]:
            E[i]["bias"] += (g_rot.sum(axis=3) ** 2).sum(axis=(0, 1))
