"""The ISA levels of the kernels: every level the CPU runs gives the same numbers.

The suite runs the default level (on an AVX-512 CPU, per layer the faster of AVX2 and
AVX-512, timed at its first call); these tests run every direct-convolution level the CPU
supports, AVX-512 included, and that per-layer choice (the same bits: every lane runs
the same FMAs) and, in a child process with ``GHESS_ISA=generic``, the im2col path
(the same numbers to rounding). The C kernels of dense layers (contractions with the
stored factors, the skinny GEMM, the activations) are built for the baseline, AVX2 and
AVX-512 and run here at every level the CPU supports: the activations give the same
bits, the sums agree to rounding (their vector lanes differ). The pooling and per-channel
kernels are built the same way and give the same bits at every level.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ConvCase

import ghess
from ghess._kernels import conv, dense

LEVELS = [level for level in (1, 2) if level <= conv.CPU_ISA]
#: the same, with the per-layer choice between them where there is one to make
LEVELS_AND_MEASURED = LEVELS + ([conv.ISA_MEASURED] if conv.CPU_ISA == 2 else [])


@pytest.fixture
def restore_isa():
    level = conv.isa()
    yield
    conv.set_isa(level)


@pytest.mark.skipif(not LEVELS, reason="no direct convolutions on this CPU")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["resnet-ce", "conv-odd-shapes-mse", "conv-relu-maxpool-ce"])
def test_levels_give_the_same_bits(name, dtype, restore_isa):
    c = ConvCase(name, dtype=dtype, n_samples=7)
    v = np.random.default_rng(0).normal(size=c.model.n_params).astype(dtype)
    results = []
    for level in LEVELS_AND_MEASURED:
        assert conv.set_isa(level) == level
        conv.forget_measured_isa()
        G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, n_threads=2)
        H = ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data, n_threads=2)
        value, grad = ghess.loss_and_grad(c.model, c.loss, c.theta, c.data)
        results.append((value, grad, G @ v, H @ v, c.model.forward(c.theta, c.X)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


DENSE_LEVELS = list(range(dense.CPU_ISA + 1))


@pytest.fixture
def restore_dense_isa():
    level = dense.isa()
    yield
    dense.set_isa(level)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dense_levels_give_the_same_activations(dtype, restore_dense_isa):
    # a grid through the branch points (0, the clamps of exp near +-36.7, 87 and 708) and
    # a length off every vector width, values, f' and f''
    x = np.concatenate([np.linspace(-800, 800, 1601), np.linspace(-40, 40, 4001),
                        np.random.default_rng(0).normal(size=1003) * 3]).astype(dtype)
    for kind in dense.ActivationKind:
        results = []
        for level in DENSE_LEVELS:
            assert dense.set_isa(level) == level
            out = [np.empty_like(x) for _ in range(3)]
            dense.activation_forward(kind, 0.7, 20.0, x, *out, 1)
            results.append(out)
        for other in results[1:]:
            for a, b in zip(results[0], other):
                np.testing.assert_array_equal(a, b, err_msg=kind.name)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 2e-5)])
def test_dense_levels_agree_on_the_products(dtype, rtol, restore_dense_isa):
    # the contractions (stored GGN and Hessian products, K = 11 outputs: a four-row pass
    # and a remainder) and the skinny GEMM (the weight gradient of the 11-output layer)
    rng = np.random.default_rng(1)
    model = ghess.Sequential(ghess.Linear(37, 29), ghess.GELU(), ghess.Linear(29, 23),
                             ghess.Tanh(), ghess.Linear(23, 11), input_shape=(37,))
    X, y = rng.normal(size=(45, 37)).astype(dtype), rng.integers(0, 11, size=45)
    theta = model.init_params(seed=2, dtype=dtype)
    v = rng.normal(size=model.n_params).astype(dtype)
    loss = ghess.CrossEntropyLoss()
    results = []
    for level in DENSE_LEVELS:
        dense.set_isa(level)
        G = ghess.GGNLinearOperator(model, loss, theta, (X, y), mode="stored")
        H = ghess.HessianLinearOperator(model, loss, theta, (X, y), mode="stored")
        results.append((ghess.loss_and_grad(model, loss, theta, (X, y))[1], G @ v, H @ v))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(a)


@pytest.fixture
def restore_maps_isa():
    level = conv.maps_isa()
    yield
    conv.set_maps_isa(level)


def _maps_results(dtype):
    """Every pooling and per-channel kernel on one grid: a tuple of output arrays."""
    rng = np.random.default_rng(4)
    n, k = 3, 2
    out = []
    # max pooling: 2x2 at stride 2 on rows longer and shorter than an AVX-512 vector,
    # and a padded 3x3 window; rounded values make ties, which go to the first maximum
    for geom in [(3, 10, 70, 2, 2, 2, 2, 0, 0, 1, 1, 5, 35),
                 (2, 8, 8, 2, 2, 2, 2, 0, 0, 1, 1, 4, 4),
                 (2, 7, 9, 3, 3, 2, 2, 1, 1, 1, 1, 4, 5),
                 (2, 7, 9, 3, 2, 1, 2, 0, 0, 1, 1, 5, 4)]:
        C, H, W, oh, ow = geom[0], geom[1], geom[2], geom[11], geom[12]
        x = np.round(rng.normal(size=(n, C * H * W)), 1).astype(dtype)
        y = np.empty((n, C * oh * ow), dtype)
        argmax = np.empty(y.shape, np.int32)
        conv.maxpool_forward(x, y, argmax, geom, 2)
        gain = rng.normal(size=y.shape).astype(dtype)
        rx = rng.normal(size=(n, k, C * H * W)).astype(dtype)
        ry = np.empty((n, k, y.shape[1]), dtype)
        conv.gather(rx, argmax, gain, ry, 2)
        back = np.empty_like(rx)
        conv.scatter_add(ry, argmax, gain, back, geom[5] >= geom[3] and geom[6] >= geom[4], 2)
        avg, avg_back = np.empty_like(y), np.empty_like(x)
        conv.avgpool_forward(x, avg, geom, 2)
        conv.avgpool_backward(avg, avg_back, geom, 2)
        out += [y, argmax, ry, back, avg, avg_back]
    # per-channel maps and sums: 5 channels of 67 positions (off every vector width)
    g = rng.normal(size=(n, k, 5 * 67)).astype(dtype)
    biased = g.copy()
    conv.channel_bias_add(biased, rng.normal(size=(k, 5)).astype(dtype), 2)
    affine = np.empty_like(g)
    conv.channel_affine(g, rng.normal(size=(1, 5)).astype(dtype),
                        rng.normal(size=(k, 5)).astype(dtype), affine, False, 2)
    sums, dots = np.zeros((k, 5), dtype), np.zeros((k, 5), dtype)
    conv.channel_bias_grad(g, sums, 2)
    conv.channel_dot(g, biased, dots, 2)
    return tuple(out) + (biased, affine, sums, dots)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_maps_levels_give_the_same_bits(dtype, restore_maps_isa):
    # pooling (max: the 2x2 vectorised path, short rows, other windows; its gather and
    # scatter; average), bias and batch-norm maps and the pairwise channel sums
    results = []
    for level in range(conv.CPU_ISA + 1):
        assert conv.set_maps_isa(level) == level == conv.maps_isa()
        results.append(_maps_results(dtype))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_maps_set_isa_is_capped_at_the_cpu(restore_maps_isa):
    assert conv.set_maps_isa(5) == conv.CPU_ISA == conv.maps_isa()
    assert conv.set_maps_isa(-1) == 0 == conv.maps_isa()


def test_dense_set_isa_is_capped_at_the_cpu(restore_dense_isa):
    assert dense.set_isa(5) == dense.CPU_ISA == dense.isa()
    assert dense.set_isa(-1) == 0 == dense.isa()


def test_set_isa_is_capped_at_the_cpu(restore_isa):
    assert conv.set_isa(5) == conv.CPU_ISA
    assert conv.set_isa(-5) == 0
    assert not conv.direct_conv_supported((1, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4))
    # measured: a choice only between AVX2 and AVX-512; without both, the best there is
    expected = conv.ISA_MEASURED if conv.CPU_ISA == 2 else conv.CPU_ISA
    assert conv.set_isa(conv.ISA_MEASURED) == expected == conv.isa()
    assert conv.isa_name() == ("measured" if conv.CPU_ISA == 2 else
                               conv.ISA_NAMES[conv.CPU_ISA])


@pytest.mark.skipif(conv.CPU_ISA < 2, reason="no AVX-512: nothing to choose between")
def test_measured_level_is_chosen_once_per_layer_and_kernel(restore_isa):
    conv.set_isa(conv.ISA_MEASURED)
    conv.forget_measured_isa()
    c = ConvCase("conv-relu-maxpool-ce", dtype=np.float32, n_samples=7)
    first = ghess.loss_and_grad(c.model, c.loss, c.theta, c.data)
    choices = conv.measured_isa_choices()
    kinds = {key[0] for key in choices}
    assert kinds == {"forward", "weight gradient"}  # the input gradient is a forward
    assert set(choices.values()) <= {1, 2}
    assert {key[4] for key in choices} == {"float32"}
    # a second call reuses the choices (none timed again, none added) and the numbers
    second = ghess.loss_and_grad(c.model, c.loss, c.theta, c.data)
    assert conv.measured_isa_choices() == choices
    np.testing.assert_array_equal(first[1], second[1])
    # a level forced by set_isa is used as it is, whatever was measured
    conv.set_isa(1)
    np.testing.assert_array_equal(ghess.loss_and_grad(c.model, c.loss, c.theta, c.data)[1],
                                  first[1])


def test_direct_kernels_refuse_a_level_the_cpu_lacks():
    geom = (1, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6)  # 3x3, padding 1: 6x6 -> 6x6
    if not conv.direct_conv_supported(geom):
        pytest.skip("no direct convolutions on this CPU")
    x = np.ones((2, 36))
    with pytest.raises(ValueError, match="level above the CPU"):
        conv.conv_forward_direct(np.ones((4, 9)), np.empty(0), x, np.empty((2, 4 * 36)), geom,
                                 1, False, conv.CPU_ISA + 1)
    with pytest.raises(ValueError, match="level above the CPU"):
        conv.conv_weight_grad_direct(np.ones((2, 1, 4 * 36)), x, np.zeros((1, 4, 9)), geom, 1,
                                     conv.CPU_ISA + 1)


CHILD = """
import numpy as np, ghess, sys
from ghess._kernels import conv, dense
from ghess.testing import reference_ggn, reference_loss_and_grad
sys.path.insert(0, {tests!r})
from conftest import ConvCase
assert conv.isa() == 0 and not conv.direct_conv_supported((1, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4))
from ghess._kernels import dense
assert dense.isa() == 0 and conv.maps_isa() == 0  # the C kernels' baseline builds too
c = ConvCase("resnet-ce", n_samples=5)
v = np.random.default_rng(0).normal(size=c.model.n_params)
G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
ref = reference_ggn(c.model, c.loss, c.theta, c.data) @ v  # the saturated case: dense
assert np.linalg.norm(G @ v - ref) <= 1e-12 * np.linalg.norm(ref)
grad = ghess.loss_and_grad(c.model, c.loss, c.theta, c.data)[1]
ref = reference_loss_and_grad(c.model, c.loss, c.theta, c.data)[1]
assert np.linalg.norm(grad - ref) <= 1e-12 * np.linalg.norm(ref)
print("ok")
"""


def test_generic_level_from_the_environment_runs_im2col():
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GHESS_ISA="generic")
    done = subprocess.run([sys.executable, "-c", CHILD.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import ghess"],
                         env=dict(os.environ, GHESS_ISA="sse9"), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "GHESS_ISA must be one of generic, avx2, avx512" in bad.stderr


def test_conv_level_from_the_environment_sets_the_direct_convolutions_alone():
    code = ("import ghess; from ghess._kernels import conv, dense; "
            "print(conv.isa_name(), dense.isa(), conv.maps_isa())")
    measured = conv.ISA_MEASURED if conv.CPU_ISA == 2 else conv.CPU_ISA
    for value, expected in (("avx2", min(conv.CPU_ISA, 1)), ("generic", 0),
                            ("measured", measured)):
        done = subprocess.run([sys.executable, "-c", code],
                              env=dict(os.environ, GHESS_CONV_ISA=value, GHESS_ISA=""),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        name, dense_level, maps_level = done.stdout.split()
        assert name == conv.isa_name(expected)
        # the other kernels keep their defaults
        assert (int(dense_level), int(maps_level)) == (dense.DEFAULT_ISA, conv.MAPS_DEFAULT_ISA)
    bad = subprocess.run([sys.executable, "-c", "import ghess"],
                         env=dict(os.environ, GHESS_CONV_ISA="sse9"), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0
    assert "GHESS_CONV_ISA must be one of measured, generic, avx2, avx512" in bad.stderr
