"""The direct convolution kernels (include/direct_conv.h) against im2col + einsum.

Also the layer paths that use them against the im2col paths they replace.
"""

import numpy as np
import pytest

import ghess
from ghess._kernels import conv as _conv

needs_direct = pytest.mark.skipif(not _conv.isa(), reason="needs AVX2 and FMA")

# (C, H, W, out_channels, kernel, stride, padding, dilation): CNN-C's and CNN-S's layers,
# widths that are not multiples of a vector, one-pixel images, taller strides, dilation
GEOMETRIES = [
    (3, 32, 32, 32, 5, 1, 2, 1),
    (32, 16, 16, 64, 3, 1, 1, 1),
    (64, 8, 8, 64, 3, 1, 1, 1),
    (1, 28, 28, 16, 3, 1, 1, 1),
    (16, 14, 14, 32, 3, 1, 1, 1),
    (2, 7, 9, 5, (2, 3), (2, 1), (1, 0), (1, 2)),
    (3, 5, 5, 7, 5, 1, 0, 1),
    (1, 1, 1, 1, 1, 1, 0, 1),
    (4, 6, 13, 13, (3, 1), (3, 1), (2, 0), (2, 1)),
    (2, 9, 3, 11, 3, 1, 2, 1),
    (5, 4, 21, 17, (1, 4), 1, (0, 3), (1, 3)),
]
TOL = {np.float64: 1e-14, np.float32: 2e-6}


def _layer(C, H, W, M, k, s, p, d, bias=True):
    layer = ghess.Conv2d(C, M, k, stride=s, padding=p, dilation=d, bias=bias)
    layer.output_shape((C, H, W))
    return layer


@needs_direct
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda t: t.__name__)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_im2col(geometry, dtype, bias):
    C, H, W, M = geometry[:4]
    layer = _layer(*geometry, bias=bias)
    geom, P = layer._geom, layer._geom[11] * layer._geom[12]
    rng = np.random.default_rng(len(str(geometry)))
    n = 5
    x = rng.standard_normal((n, C * H * W)).astype(dtype)
    w = rng.standard_normal((M, layer.patch_size)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype) if bias else np.empty(0, dtype)
    x0, w0 = x.copy(), w.copy()
    expected = np.einsum("mk,nkp->nmp", w.astype(np.float64),
                         layer._unfold(x, 1).astype(np.float64))
    if bias:
        expected += b[None, :, None]
    for n_threads in (1, 2):
        out = np.full((n, M * P), np.nan, dtype=dtype)   # every element must be written
        _conv.conv_forward_direct(w, b, x, out, geom, n_threads)
        err = np.abs(out.reshape(n, M, P) - expected).max() / np.abs(expected).max()
        assert err < TOL[dtype], err
        if n_threads == 1:
            first = out.copy()
        else:  # per sample, the same operations whatever the thread
            assert np.array_equal(out, first)
        # accumulate: out += (the R-forward's W phi(R{x}) and the R-backward's W^T R{g})
        start = rng.standard_normal((n, M * P)).astype(dtype)
        out = start.copy()
        _conv.conv_forward_direct(w, b, x, out, geom, n_threads, True)
        err = (np.abs(out.reshape(n, M, P) - start.reshape(n, M, P) - expected).max()
               / np.abs(expected).max())
        assert err < 4 * TOL[dtype], err
    assert np.array_equal(x, x0) and np.array_equal(w, w0)


@needs_direct
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda t: t.__name__)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("k", [1, 3])
def test_weight_grad_matches_im2col(geometry, dtype, k):
    C, H, W, M = geometry[:4]
    layer = _layer(*geometry)
    geom, P, K = layer._geom, layer._geom[11] * layer._geom[12], layer.patch_size
    rng = np.random.default_rng(len(str(geometry)) + k)
    n = 5
    x = rng.standard_normal((n, C * H * W)).astype(dtype)
    g = rng.standard_normal((n, k, M * P)).astype(dtype)
    start = rng.standard_normal((k, M, K)).astype(dtype)   # accumulated into
    expected = start + np.einsum("njmp,nkp->jmk", g.reshape(n, k, M, P).astype(np.float64),
                                 layer._unfold(x, 1).astype(np.float64))
    for n_threads in (1, 2):
        out = start.copy()
        _conv.conv_weight_grad_direct(g, x, out, geom, n_threads)
        err = np.abs(out - expected).max() / np.abs(expected).max()
        assert err < TOL[dtype], (n_threads, err)


@needs_direct
def test_kernels_reject_what_they_cannot_do():
    layer = _layer(2, 8, 8, 3, 3, 2, 1, 1)      # stride 2 along the width
    x = np.zeros((1, 128))
    with pytest.raises(ValueError, match="stride 1"):
        _conv.conv_forward_direct(np.zeros((3, 18)), np.empty(0), x, np.zeros((1, 48)),
                                  layer._geom, 1)
    assert not _conv.direct_conv_supported(layer._geom)
    layer = _layer(2, 8, 8, 3, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        _conv.conv_forward_direct(np.zeros((3, 18)), np.zeros(2), x, np.zeros((1, 192)),
                                  layer._geom, 1)


def _model():
    # direct-capable layers (stride 1 along the width), then one that is not (stride 2)
    return ghess.Sequential(
        ghess.Conv2d(3, 6, 3, padding=1), ghess.Tanh(), ghess.MaxPool2d(2),
        ghess.Conv2d(6, 5, (3, 2), padding=(1, 0), dilation=(1, 2)), ghess.Softplus(),
        ghess.Conv2d(5, 4, 3, stride=(2, 1), padding=1), ghess.ReLU(),
        ghess.Conv2d(4, 4, 3, stride=(1, 2), padding=1),
        ghess.Flatten(), ghess.Linear(8, 3), input_shape=(3, 8, 9))


@needs_direct
@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_every_operation_agrees_with_the_im2col_paths(mode):
    model = _model()
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((9, 3, 8, 9)), rng.integers(0, 3, 9)
    theta = model.init_params(seed=2)
    loss = ghess.CrossEntropyLoss()
    V = rng.standard_normal((model.n_params, 2))

    def run():
        value, grad = ghess.loss_and_grad(model, loss, theta, (X, y), chunk_size=4)
        G = ghess.GGNLinearOperator(model, loss, theta, (X, y), mode=mode, chunk_size=4)
        H = ghess.HessianLinearOperator(model, loss, theta, (X, y), mode=mode, chunk_size=4)
        J = ghess.per_sample_jacobians(model, theta, X, chunk_size=4)
        return [np.array([value]), grad, G @ V, H @ V, J]

    direct = run()
    assert [_conv.direct_conv_supported(layer._geom) for layer in model.layers
            if isinstance(layer, ghess.Conv2d)] == [True, True, True, False]
    level = _conv.isa()
    _conv.set_isa(0)  # the im2col path, for operators built from now on
    try:
        assert not _conv.direct_conv_supported(model.layers[0]._geom)
        im2col = run()
    finally:
        _conv.set_isa(level)
    for a, b in zip(direct, im2col):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13 * np.abs(b).max())


@needs_direct
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda t: t.__name__)
@pytest.mark.parametrize("geometry", GEOMETRIES + [(2, 6, 6, 3, 3, 1, 3, 1)], ids=str)
def test_input_grad_as_a_convolution_matches_col2im(geometry, dtype):
    C, H, W, M = geometry[:4]
    layer = _layer(*geometry)
    P = layer._geom[11] * layer._geom[12]
    rng = np.random.default_rng(len(str(geometry)))
    params = {"weight": rng.standard_normal((M, C) + layer.kernel_size).astype(dtype),
              "bias": np.zeros(M, dtype)}
    n, k = 4, 3
    g = rng.standard_normal((n, k, M * P)).astype(dtype)
    g0 = g.copy()
    expected = np.empty((n, k, C * H * W), dtype)
    layer._input_grad(layer._weight(params), g, expected, False, 1)
    got = layer.vjp(params, {}, g, None, True, 2)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= TOL[dtype] * 10 * scale
    assert np.array_equal(g, g0)
    # stride 1 both ways and padding within the kernel's span: the direct path applies
    s, p = layer.stride, layer.padding
    spans = [d * (kk - 1) for d, kk in zip(layer.dilation, layer.kernel_size)]
    applies = s == (1, 1) and all(pp <= sp for pp, sp in zip(p, spans))
    assert (layer._transposed_geometry() is not None) == applies


@needs_direct
def test_stored_operators_keep_inputs_not_unfolded_inputs_and_do_not_grow():
    model = _model()
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((9, 3, 8, 9)), rng.integers(0, 3, 9)
    theta = model.init_params(seed=4)
    loss = ghess.CrossEntropyLoss()
    G = ghess.GGNLinearOperator(model, loss, theta, (X, y), mode="stored", chunk_size=4)
    H = ghess.HessianLinearOperator(model, loss, theta, (X, y), mode="stored", chunk_size=4)
    conv = [i for i, layer in enumerate(model.layers) if isinstance(layer, ghess.Conv2d)]
    kept = {f.index: set(f.ctx) for chunk in G._stored for f in chunk.layers}
    assert [kept[i] for i in conv] == [{"x"}, {"x"}, {"x"}, {"cols"}]
    before = (G.memory_bytes, sum(c.nbytes() for c in G._stored))
    V = rng.standard_normal((model.n_params, 3))
    for _ in range(2):
        G @ V, H @ V, G.block("0.weight", "3.weight")
    assert (G.memory_bytes, sum(c.nbytes() for c in G._stored)) == before
    assert {f.index: set(f.ctx) for chunk in G._stored for f in chunk.layers} == kept
    for trace in H._stored:
        assert all("cols" not in trace.ctxs[i] for i in conv[:3])
    # a direct layer's stored input is C*H*W numbers per sample, its phi(x) C*kh*kw*P
    layer = model.layers[conv[1]]
    shape = model.shapes[conv[1]]
    assert layer.factor_bytes(shape, 8, False) == int(np.prod(shape)) * 8
    assert layer.factor_bytes(shape, 8, True) == 0
