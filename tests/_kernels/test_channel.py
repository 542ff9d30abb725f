"""The per-channel kernels of batch norm: affine maps and channel dot products."""

import numpy as np
import pytest

from ghess._kernels import conv

NO_SHIFT = np.empty((0, 0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_channel_affine_broadcasts_and_accumulates(dtype):
    rng = np.random.default_rng(0)
    n, k, M, P = 5, 3, 4, 7
    x1 = rng.normal(size=(n, 1, M * P)).astype(dtype)
    xk = rng.normal(size=(n, k, M * P)).astype(dtype)
    scale = rng.normal(size=(k, M)).astype(dtype)
    shift = rng.normal(size=(1, M)).astype(dtype)
    out = np.empty((n, k, M * P), dtype=dtype)
    conv.channel_affine(x1, scale, shift, out, False, 2)
    expected = (x1.reshape(n, 1, M, P) * scale[None, :, :, None] + shift[None, :, :, None])
    np.testing.assert_allclose(out.reshape(n, k, M, P), expected, rtol=1e-6)
    before = out.copy()
    conv.channel_affine(xk, scale[:1], NO_SHIFT.astype(dtype), out, True, 2)
    np.testing.assert_allclose(out - before, (xk.reshape(n, k, M, P)
                                              * scale[:1, :, None]).reshape(n, k, -1),
                               rtol=1e-5, atol=1e-6)


def test_channel_dot_is_pairwise_and_thread_count_independent():
    rng = np.random.default_rng(1)
    n, k, M, P = 7, 2, 3, 33 * 33  # long position sums: the pairwise path
    g = rng.normal(size=(n, k, M * P))
    x = rng.normal(size=(n, 1, M * P))
    outs = []
    for threads in (1, 2, 3):
        out = np.zeros((k, M))
        conv.channel_dot(g, x, out, threads)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    expected = np.einsum("nkmp,nmp->km", g.reshape(n, k, M, P), x.reshape(n, M, P))
    np.testing.assert_allclose(outs[0], expected, rtol=1e-13)
    with pytest.raises(ValueError, match="channel_dot"):
        conv.channel_dot(g, np.ascontiguousarray(x[:, :, :-1]), np.zeros((k, M)), 1)
