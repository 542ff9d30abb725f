"""The vectorised float64 and float32 tanh (include/vecmath.h) against libm, element by element."""

import numpy as np
import pytest

import ghess


def _forward(x, need, n_threads=1):
    ctx = {}
    y = ghess.Tanh().forward(None, x.reshape(1, -1), ctx, need, n_threads)
    return y.reshape(-1), ctx


def _points():
    rng = np.random.default_rng(0)
    tiny = np.array([0.0, 5e-324, 1e-310, 1e-300, 1e-20, 1e-8, 1e-4])
    # around the switch from the expm1 polynomial to exp - 1 (|x| = 0.35) and the
    # saturation (|x| = 20), then a dense grid and random draws at every scale
    edges = np.concatenate([0.35 + np.linspace(-1e-3, 1e-3, 201),
                            20 + np.linspace(-1e-2, 1e-2, 201), [19.06, 22.0, 1e3, 1e300]])
    grid = np.linspace(0, 25, 100_001)
    draws = np.concatenate([rng.normal(size=20_000), np.exp(rng.uniform(-40, 3.3, 20_000))])
    positive = np.concatenate([tiny, edges, grid, np.abs(draws)])
    return np.concatenate([positive, -positive])


def test_tanh_within_four_ulp_of_libm():
    x = _points()
    y, _ = _forward(x, 0)
    expected = np.tanh(x)
    ulp = np.spacing(np.abs(expected))
    worst = np.max(np.abs(y - expected) / ulp)
    assert worst <= 4, f"{worst} ulp at x = {x[np.argmax(np.abs(y - expected) / ulp)]!r}"
    assert np.array_equal(np.signbit(y), np.signbit(expected))  # tanh(-0.0) = -0.0
    assert np.all(np.abs(y) <= 1)


def test_tanh_of_infinities_is_plus_or_minus_one():
    y, _ = _forward(np.array([np.inf, -np.inf]), 0)
    assert y.tolist() == [1.0, -1.0]


def test_derivatives_follow_from_the_value():
    x = _points()
    y, ctx = _forward(x, 2)
    d1, d2 = ctx["d1"].reshape(-1), ctx["d2"].reshape(-1)
    np.testing.assert_array_equal(d1, 1.0 - y * y)
    np.testing.assert_array_equal(d2, -2.0 * y * (1.0 - y * y))
    t = np.tanh(x)
    np.testing.assert_allclose(d1, 1.0 - t * t, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n_threads", [2, 3])
def test_threads_give_identical_values(n_threads):
    x = _points()[:12_345]
    one, ctx_one = _forward(x, 2, 1)
    many, ctx_many = _forward(x, 2, n_threads)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(ctx_one["d2"], ctx_many["d2"])


def test_empty_input():
    for dtype in (np.float64, np.float32):
        y, ctx = _forward(np.empty(0, dtype=dtype), 2)
        assert y.shape == (0,) and y.dtype == dtype and ctx["d1"].shape == (1, 0)


def test_float32_tanh_within_four_ulp_of_the_exact_value():
    x64 = _points()
    x64 = x64[np.abs(x64) < 3e38]
    x = np.concatenate([x64.astype(np.float32), np.linspace(-12, 12, 200_001, dtype=np.float32),
                        np.float32([np.inf, -np.inf, 1e-40, -1e-45])])
    y, ctx = _forward(x, 2)
    assert y.dtype == np.float32
    exact = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    err = np.abs(y - exact) / ulp
    assert err.max() <= 4, f"{err.max()} ulp at x = {x[np.argmax(err)]!r}"
    assert np.array_equal(np.signbit(y), np.signbit(x))
    d1, d2 = ctx["d1"].reshape(-1), ctx["d2"].reshape(-1)
    np.testing.assert_array_equal(d1, np.float32(1) - y * y)
    np.testing.assert_array_equal(d2, np.float32(-2) * y * (np.float32(1) - y * y))
    many, _ = _forward(x, 0, 3)
    np.testing.assert_array_equal(many, y)


# -- sigmoid, SiLU, GELU (both forms) and ELU: vectorised blocks against the reference ----

BLOCK_LAYERS = {"sigmoid": ghess.Sigmoid, "silu": ghess.SiLU, "gelu": ghess.GELU,
                "gelu-tanh": lambda: ghess.GELU("tanh"), "elu": lambda: ghess.ELU(0.7)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", sorted(BLOCK_LAYERS))
def test_vectorised_activation_blocks_match_the_reference(name, dtype):
    """f, f', f'' on a dense grid, the switch points and saturation, in both dtypes.

    The error is measured against the size of the terms each derivative sums (f' and
    f'' cross zero, where only an absolute error is meaningful); float64 within a few
    ulp, float32 within a few float32 ulp.
    """
    from ghess.testing.reference import _activation

    layer = BLOCK_LAYERS[name]()
    limit = 700.0 if dtype == np.float64 else 80.0
    x = np.concatenate([_points()[np.abs(_points()) <= limit], [limit, -limit],
                        np.linspace(-8.5, 8.5, 20_001)]).astype(dtype)
    ctx = {}
    y = layer.forward(None, x.reshape(1, -1), ctx, 2, 2)
    got = (y.reshape(-1), ctx["d1"].reshape(-1), ctx["d2"].reshape(-1))
    x64 = x.astype(np.float64)
    want = _activation(layer, x64)
    # the terms' size: |f| + |x| |f'| bounds what each formula adds up
    size = [np.abs(want[0]) + np.abs(x64 * want[1]), np.abs(want[1]) + np.abs(x64 * want[2]),
            np.abs(want[2]) + np.abs(want[1]) + np.abs(x64 * want[2])]
    eps = np.finfo(dtype).eps
    for order, (g, w, s) in enumerate(zip(got, want, size)):
        # near the underflow threshold, where exp's result is taken as 0 and the
        # derivatives multiply it by polynomial factors up to ~1e5, values are compared
        # absolutely: below 1e-280 (float64) or 1e-30 (float32, 1e-25 for f'')
        floor = 1e-280 if dtype == np.float64 else (1e-25 if order == 2 else 1e-30)
        err = np.abs(g.astype(np.float64) - w) / np.maximum(s, floor)
        worst = int(np.argmax(err))
        assert err[worst] <= 64 * eps, (
            f"{name} derivative {order}: error {err[worst]:.2e} at x = {x64[worst]!r} "
            f"(got {g[worst]!r}, want {w[worst]!r})")
