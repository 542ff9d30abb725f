"""per_sample_jacobians(..., out=buffer): every element written, bad buffers refused."""

import numpy as np
import pytest
from conftest import CASES, CONV_CASES, RTOL, Case, ConvCase

import ghess
from ghess.testing import assert_allclose_rel, reference_per_sample_jacobians


def _case(name):
    return ConvCase(name) if name in CONV_CASES else Case(name)


@pytest.mark.parametrize("name", sorted(CASES) + sorted(CONV_CASES))
@pytest.mark.parametrize("chunk_size", [1, 3, 256])
def test_out_buffer_is_filled_exactly(name, chunk_size):
    # NaN everywhere first: an element the kernels skip would stay NaN
    c = _case(name)
    expected = reference_per_sample_jacobians(c.model, c.theta, c.X)
    out = np.full(expected.shape, np.nan)
    J = ghess.per_sample_jacobians(c.model, c.theta, c.X, chunk_size=chunk_size, out=out)
    assert J is out
    assert_allclose_rel(J, expected, RTOL[np.float64])
    # a second call into the same (now dirty) buffer gives the same numbers
    again = ghess.per_sample_jacobians(c.model, c.theta, c.X + 0.5, out=out)
    assert_allclose_rel(again, reference_per_sample_jacobians(c.model, c.theta, c.X + 0.5),
                        RTOL[np.float64])


def test_out_float32():
    c = Case("tanh-ce", dtype=np.float32)
    fresh = ghess.per_sample_jacobians(c.model, c.theta, c.X)
    out = np.full_like(fresh, np.nan)
    np.testing.assert_array_equal(ghess.per_sample_jacobians(c.model, c.theta, c.X, out=out),
                                  fresh)


def _bad_buffers(shape):
    base = np.zeros(shape)
    readonly = np.zeros(shape)
    readonly.flags.writeable = False
    return [
        (TypeError, "NumPy array", base.tolist()),
        (TypeError, "dtype float64", np.zeros(shape, np.float32)),
        (ValueError, "must have shape", np.zeros(shape[:2] + (shape[2] + 1,))),
        (ValueError, "must have shape", np.zeros(shape[1:])),
        (ValueError, "C-contiguous", np.zeros(shape[::-1]).T),
        (ValueError, "read-only", readonly),
    ]


@pytest.mark.parametrize("index", range(6))
def test_bad_out_is_refused_and_left_alone(index):
    c = Case("tanh-ce")
    shape = (c.X.shape[0], c.model.n_outputs, c.model.n_params)
    error, message, out = _bad_buffers(shape)[index]
    before = np.array(out, copy=True)
    with pytest.raises(error, match=message):
        ghess.per_sample_jacobians(c.model, c.theta, c.X, out=out)
    np.testing.assert_array_equal(np.asarray(out), before)


def test_out_sharing_memory_with_an_input_is_refused():
    # inputs that are views into the buffer would be overwritten while still being read
    c = Case("tanh-ce")
    shape = (c.X.shape[0], c.model.n_outputs, c.model.n_params)
    out = np.zeros(shape)
    flat = out.reshape(-1)
    X = flat[:c.X.size].reshape(c.X.shape)
    X[...] = c.X
    with pytest.raises(ValueError, match="shares memory"):
        ghess.per_sample_jacobians(c.model, c.theta, X, out=out)
    theta = flat[-c.theta.size:]
    theta[...] = c.theta
    with pytest.raises(ValueError, match="shares memory"):
        ghess.per_sample_jacobians(c.model, theta, c.X, out=out)
    np.testing.assert_array_equal(X, c.X)
    np.testing.assert_array_equal(theta, c.theta)
