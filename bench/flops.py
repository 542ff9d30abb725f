"""Flops of the benchmarked operations.

ghess's are counted from its layers (:func:`ghess_gemm_flops`); PyTorch's and XLA's
are counted where those run (``bench/competitors``); the NumPy reference has no
counter and gets nominal multiples of F, one forward pass's GEMM flops
(:data:`FLOPS_PER_FORWARD`).
"""

from . import _internals

#: nominal flops of an operation, in units of F (one forward pass's GEMM flops)
FLOPS_PER_FORWARD = {"forward": 1, "loss+grad": 3, "Jacobian product": 1, "GGN product": 2,
                     "GGN matmat x16": 32, "Hessian product": 6}


def layer_forward_flops(model, n_samples):
    """GEMM flops of each dense and conv layer in one forward pass over ``n_samples``.

    A residual block counts its inner layers (one entry for the block).
    """
    return [_flops(layer, shape, n_samples) for layer, shape in
            zip(model.layers, model.shapes[:-1])]


def _flops(layer, input_shape, n_samples):
    """Return a layer's forward GEMM flops for per-sample input ``input_shape``."""
    import ghess

    if isinstance(layer, ghess.Residual):
        return sum(f for chain in _chains(layer, input_shape, n_samples) for f in chain)
    if isinstance(layer, ghess.Linear):
        return 2 * n_samples * layer.in_features * layer.out_features
    if isinstance(layer, ghess.Conv2d):
        out_shape = layer.output_shape(input_shape)
        kh, kw = layer.kernel_size
        return (2 * n_samples * layer.out_channels * layer.in_channels * kh * kw
                * out_shape[1] * out_shape[2])
    return 0


def _chains(block, input_shape, n_samples):
    """Per branch of a residual block, its inner layers' forward flops over ``n_samples``."""
    chains = []
    for layers in (block.body, block.shortcut):
        shape, flops = tuple(input_shape), []
        for layer in layers:
            flops.append(_flops(layer, shape, n_samples))
            shape = tuple(layer.output_shape(shape))
        chains.append(flops)
    return chains


def _block_ggn_extra(model, n_samples):
    """Return what a stored GGN product spends beyond 2 F in the residual blocks.

    A block is one factor layer: its product runs the tangent through its chains
    (V a, and W R{a} past the first layer with parameters) and the cotangent back
    (weight gradients, and input gradients above that layer): 4 f per inner layer
    less 2 f of each chain's first one with parameters, against 2 f counted.
    """
    import ghess

    extra = 0
    for layer, shape in zip(model.layers, model.shapes[:-1]):
        if isinstance(layer, ghess.Residual):
            for chain in _chains(layer, shape, n_samples):
                first = next((f for f in chain if f), 0)
                extra += 2 * sum(chain) - 2 * first
    return extra


def forward_flops(model, n_samples):
    """GEMM flops of one forward pass over ``n_samples``: dense and conv layers only."""
    return sum(layer_forward_flops(model, n_samples))


def ghess_gemm_flops(model, n_samples):
    """GEMM flops of ghess's algorithms, counted from the layers (op -> flops).

    With F_l a layer's forward GEMM flops, F their sum and F_1 the first layer's
    (whose input gradient is never formed and whose R{input} is zero): loss+grad
    3F - F_1 (forward, weight and input gradients); stored GGN product 2F (per
    layer V a and S a^T, plus the contractions with D); stored Hessian product
    6F - 4F_1 (R-forward V a + W R{a}; R-backward R{g}^T a + g^T R{a}, W^T R{g} +
    V^T g); the recompute modes add the forward (and, for the Hessian, the
    backward of the gradient trace); a stored Jacobian product F.
    """
    import numpy as np

    layer_flops = layer_forward_flops(model, n_samples)
    F, F1 = sum(layer_flops), layer_flops[0]
    # contractions with the stored D: 2 flops per element of D, in J v and in J^T u (a
    # D shared by all samples, the output layer's weight, is contracted as one GEMM)
    d_elements = 0
    for i, (path, bytes_, shared) in _internals.factor_plan(model, 8).items():
        end = path[-1] + 1 if path else i + 1
        d_elements += (model.n_outputs * int(np.prod(model.shapes[end])) if shared
                       else (bytes_ - _internals.path_bytes(model, path, 8)) // 8)
    contractions = 2 * 2 * n_samples * d_elements
    block_extra = _block_ggn_extra(model, n_samples)
    return {"forward": F, "loss+grad": 3 * F - F1,
            "GGN product (stored)": 2 * F + contractions + block_extra,
            "GGN product (recompute)": F + 2 * (2 * F - F1),
            "GGN matmat x16 (stored)": 16 * (2 * F + contractions + block_extra),
            "Hessian product (stored)": 6 * F - 4 * F1,
            "Hessian product (recompute)": (6 * F - 4 * F1) + F + (F - F1),
            "Jacobian product (stored)": F + contractions // 2}
