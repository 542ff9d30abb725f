#!/usr/bin/env python
"""Side-by-side benchmark of ghess against NumPy, PyTorch, JAX and curvlinops.

Usage::

    python bench/run.py                      # every problem, float32/64, 1 and 2 threads
    python bench/run.py --quick              # tiny problems, to prove the script works
    python bench/run.py --problems MLP-S --dtypes float64 --threads 1 --output /tmp/b

The suite
---------
Each configuration (problem, dtype, threads) runs in its own worker process. The
worker restricts itself to ``threads`` CPU cores (``os.sched_setaffinity``) and the
driver sets the OpenMP/BLAS thread counts in its environment, all before numpy is
imported. The core restriction applies to every implementation alike; it is what
bounds XLA, whose CPU thread pool has no size flag (with one thread the worker also
gets ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``).

Implementations, all on the same weights, data and vectors (the cross-entropy
loss with ``reduction="sum"``):

- ghess: forward, loss+grad, GGN and Hessian products in stored and recompute
  mode, GGN matmat with 16 columns, Jacobian products, per-sample Jacobians, and
  the operator builds;
- numpy: the pure-NumPy reference products of ``ghess.testing``;
- torch.func: GGN product (jvp, closed-form softmax B, vjp), Hessian product
  (jvp of grad), Jacobian product, per-sample Jacobians ``vmap(jacrev)``; and
  PyTorch's ordinary forward and ``loss.backward()`` (named "torch");
- JAX: the same operations, each under ``jax.jit``, in float64 with x64 enabled;
- curvlinops: ``GGNLinearOperator`` and ``HessianLinearOperator`` multiplied by a
  torch tensor.

PyTorch, JAX and curvlinops are optional: a competitor that cannot be imported is
skipped and named in the report. Every result is checked against ghess (relative
2-norm error at most 1e-10 in float64, 1e-3 in float32) before anything is timed.

Per-sample Jacobians are dense (N, K, n_params) arrays. When that exceeds 2 GiB in
float64 (the MLPs), every implementation computes them for the same first
``n`` samples, the most whose float64 output fits in 256 MiB; the report names
``n``. torch.func and JAX return one block per parameter tensor; their timings
exclude the concatenation into one array (done only for the agreement check).

Measurements
------------
- time: median over repeats after a warm-up;
- interleaved: every operation of a worker is timed in rounds, one run of each per
  round, so that ratios compare timings taken under the same machine conditions; with
  2 threads a library's operations run together in each round, after the previous
  library's thread pool has stopped spinning (``interleaved_times``, ``SETTLE``);
- flops counted per implementation (ghess from its layers, PyTorch by
  FlopCounterMode, JAX by XLA's cost analysis; nominal multiples of the forward
  GEMM work for the NumPy reference), as a fraction of a 1024 x 784 x 512 GEMM
  timed in the same worker; per-sample Jacobians report their output rate in GB/s;
- peak extra resident memory: after all timings, each operation runs once more
  while a thread samples the resident set size every 0.5 ms (and, where Linux
  lets a process reset it, the kernel's high-water mark is read too); reported is
  the peak minus the resident size just before the call.

The report (``RESULTS.md``, ``results.json``; ``--quick`` writes ``RESULTS_quick.md``)
opens with a summary of the targets: ghess's stored GGN product 2x faster than the
fastest of torch.func/JAX/curvlinops, its Hessian product 1.5x, loss+grad no slower
than PyTorch, per-sample Jacobians 1.5x faster than torch.func, 5x faster products
than the NumPy reference on conv nets, and a 1.7x speed-up from 1 to 2 threads on
CNN-C.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))

#: per-sample Jacobians above this many float64 bytes run on a sub-batch ...
JACOBIAN_FULL_LIMIT = 2 * 2**30
#: ... of as many samples as fit in this many float64 bytes
JACOBIAN_SUBBATCH_BYTES = 256 * 2**20

#: nominal flops of an operation, in units of F (one forward pass's GEMM flops)
FLOPS_PER_FORWARD = {"forward": 1, "loss+grad": 3, "Jacobian product": 1, "GGN product": 2,
                     "GGN matmat x16": 32, "Hessian product": 6}
#: operations whose result is an operator, not numbers to compare
UNCHECKED_OPS = {"GGN build", "Hessian build"}
#: ghess's entry for each operation the competitors are compared with
GHESS_MAIN = {"forward": "ghess forward", "loss+grad": "ghess loss+grad",
              "GGN product": "ghess GGN product (stored)",
              "Hessian product": "ghess Hessian product (stored)",
              "Jacobian product": "ghess Jacobian product (stored)",
              "per-sample Jacobians": "ghess per-sample Jacobians (out=)"}


class Target(NamedTuple):
    """ghess's ``op`` must be ``ratio`` times faster than the fastest of ``rivals``."""

    column: str
    op: str
    rivals: tuple
    ratio: float
    conv_only: bool = False


TARGETS = (
    Target("GGN vs best (>=2x)", "GGN product", ("torch.func", "JAX", "curvlinops"), 2.0),
    Target("Hessian vs best (>=1.5x)", "Hessian product", ("torch.func", "JAX", "curvlinops"),
           1.5),
    Target("loss+grad vs torch (>=1x)", "loss+grad", ("torch",), 1.0),
    Target("Jacobians vs torch.func (>=1.5x)", "per-sample Jacobians", ("torch.func",), 1.5),
    Target("GGN vs NumPy (>=5x, CNN)", "GGN product", ("numpy",), 5.0, conv_only=True),
    Target("Hessian vs NumPy (>=5x, CNN)", "Hessian product", ("numpy",), 5.0, conv_only=True),
)
#: ghess's 1 -> 2 thread speed-up of these products must reach SCALING_TARGET ...
SCALING_OPS = ("GGN product", "Hessian product")
SCALING_TARGET = 1.7
#: ... on these problems
SCALING_PROBLEMS = ("CNN-C",)


def _problems():
    """Name -> (model factory, batch); PyTorch layouts, NCHW."""
    import ghess as G

    return {
        "MLP-S": (lambda: G.Sequential(G.Linear(784, 256), G.Tanh(), G.Linear(256, 10),
                                       input_shape=(784,)), 256),
        "MLP-M": (lambda: G.Sequential(G.Linear(784, 512), G.ReLU(), G.Linear(512, 512),
                                       G.ReLU(), G.Linear(512, 10), input_shape=(784,)), 1024),
        "MLP-M-tanh": (lambda: G.Sequential(G.Linear(784, 512), G.Tanh(), G.Linear(512, 512),
                                            G.Tanh(), G.Linear(512, 10), input_shape=(784,)),
                       1024),
        "CNN-S": (lambda: G.Sequential(
            G.Conv2d(1, 16, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(16, 32, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Flatten(), G.Linear(32 * 7 * 7, 10), input_shape=(1, 28, 28)), 128),
        "CNN-C": (lambda: G.Sequential(
            G.Conv2d(3, 32, 5, padding=2), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(32, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(64, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Flatten(), G.Linear(64 * 4 * 4, 10), input_shape=(3, 32, 32)), 64),
        "tiny": (lambda: G.Sequential(G.Linear(20, 16), G.Tanh(), G.Linear(16, 4),
                                      input_shape=(20,)), 32),
        "tiny-cnn": (lambda: G.Sequential(G.Conv2d(1, 4, 3, padding=1), G.ReLU(),
                                          G.MaxPool2d(2), G.Flatten(), G.Linear(64, 3),
                                          input_shape=(1, 8, 8)), 16),
    }


# -- problem set-up ------------------------------------------------------------------------
class Setup(NamedTuple):
    """One configuration's model, data and vectors, shared by every implementation."""

    model: object
    loss: object
    theta: object  # (n_params,)
    X: object  # (N, *input_shape)
    y: object  # (N,) labels
    V: object  # (16, n_params) directions
    v: object  # V[0]
    Xj: object  # the samples of the per-sample Jacobian operations
    threads: int


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


def pin_to_cores(threads):
    """Restrict this process to ``threads`` of the cores it may use; return them."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cores = allowed[:threads] if threads <= len(allowed) else allowed
    os.sched_setaffinity(0, cores)
    return cores


def layer_forward_flops(model, n_samples):
    """GEMM flops of each dense and conv layer in one forward pass over ``n_samples``."""
    import ghess

    flops = []
    for layer, out_shape in zip(model.layers, model.shapes[1:]):
        if isinstance(layer, ghess.Linear):
            flops.append(2 * n_samples * layer.in_features * layer.out_features)
        elif isinstance(layer, ghess.Conv2d):
            kh, kw = layer.kernel_size
            out_positions = out_shape[1] * out_shape[2]
            flops.append(2 * n_samples * layer.out_channels * layer.in_channels * kh * kw
                         * out_positions)
    return flops


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

    from ghess import _engine

    layer_flops = layer_forward_flops(model, n_samples)
    F, F1 = sum(layer_flops), layer_flops[0]
    # contractions with the stored D: 2 flops per element of D, in J v and in J^T u (a
    # D shared by all samples, the output layer's weight, is contracted as one GEMM)
    d_elements = 0
    for i, (path, bytes_, shared) in _engine.factor_plan(model, 8).items():
        end = path[-1] + 1 if path else i + 1
        d_elements += (model.n_outputs * int(np.prod(model.shapes[end])) if shared
                       else (bytes_ - _engine.path_bytes(model, path, 8)) // 8)
    contractions = 2 * 2 * n_samples * d_elements
    return {"forward": F, "loss+grad": 3 * F - F1,
            "GGN product (stored)": 2 * F + contractions,
            "GGN product (recompute)": F + 2 * (2 * F - F1),
            "GGN matmat x16 (stored)": 16 * (2 * F + contractions),
            "Hessian product (stored)": 6 * F - 4 * F1,
            "Hessian product (recompute)": (6 * F - 4 * F1) + F + (F - F1),
            "Jacobian product (stored)": F + contractions // 2}


def jacobian_samples(model, n_samples):
    """How many samples the per-sample Jacobian operations use (sized in float64)."""
    per_sample = model.n_outputs * model.n_params * 8
    if n_samples * per_sample <= JACOBIAN_FULL_LIMIT:
        return n_samples
    return max(1, JACOBIAN_SUBBATCH_BYTES // per_sample)


def make_setup(problem, dtype_name, threads):
    """Build the model, draw weights, data and directions (seed 0)."""
    import numpy as np

    import ghess

    make_model, batch = _problems()[problem]
    model = make_model()
    dtype = np.dtype(dtype_name)
    rng = np.random.default_rng(0)
    theta = model.init_params(seed=0, dtype=dtype)
    X = rng.normal(size=(batch,) + model.input_shape).astype(dtype)
    y = rng.integers(0, model.n_outputs, size=batch)
    V = rng.normal(size=(16, model.n_params)).astype(dtype)
    return Setup(model, ghess.CrossEntropyLoss(reduction="sum"), theta, X, y, V, V[0],
                 X[:jacobian_samples(model, batch)], threads)


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


# -- competitors ---------------------------------------------------------------------------
def ghess_competitor(s):
    """Return ghess's operations; each operation's first entry is the reference."""
    import numpy as np

    import ghess

    model, loss, theta, data, t = s.model, s.loss, s.theta, (s.X, s.y), s.threads

    def operator(cls, mode):
        return cls(model, loss, theta, data, mode=mode, n_threads=t)

    G = operator(ghess.GGNLinearOperator, "stored")
    Gr = operator(ghess.GGNLinearOperator, "recompute")
    H = operator(ghess.HessianLinearOperator, "stored")
    Hr = operator(ghess.HessianLinearOperator, "recompute")
    J = ghess.JacobianLinearOperator(model, theta, s.X, mode="stored", n_threads=t)
    v, V = s.v, s.V
    buffers = []

    def jacobian_buffer():
        if not buffers:
            shape = (len(s.Xj), model.n_outputs, model.n_params)
            buffers.append(np.empty(shape, dtype=theta.dtype))
        return buffers[0]

    ops = {
        "ghess forward": Op("forward", lambda: model.forward(theta, s.X, n_threads=t)),
        "ghess loss+grad": Op("loss+grad", lambda: ghess.loss_and_grad(
            model, loss, theta, data, n_threads=t), loss_grad_to_numpy),
        "ghess GGN build (stored)": Op(
            "GGN build", lambda: operator(ghess.GGNLinearOperator, "stored")),
        "ghess GGN product (stored)": Op("GGN product", lambda: G @ v),
        "ghess GGN product (recompute)": Op("GGN product", lambda: Gr @ v),
        "ghess GGN matmat x16 (stored)": Op("GGN matmat x16", lambda: G.matmat(V.T)),
        "ghess Hessian build (stored)": Op(
            "Hessian build", lambda: operator(ghess.HessianLinearOperator, "stored")),
        "ghess Hessian product (stored)": Op("Hessian product", lambda: H @ v),
        "ghess Hessian product (recompute)": Op("Hessian product", lambda: Hr @ v),
        "ghess Jacobian product (stored)": Op("Jacobian product", lambda: J @ v),
        "ghess per-sample Jacobians": Op("per-sample Jacobians", lambda: (
            ghess.per_sample_jacobians(model, theta, s.Xj, n_threads=t))),
        # the same into a buffer reused across calls (allocated by the warm-up call): the
        # fresh output's first-touch page faults, not ghess's work, dominate the row above
        "ghess per-sample Jacobians (out=)": Op("per-sample Jacobians", lambda: (
            ghess.per_sample_jacobians(model, theta, s.Xj, n_threads=t,
                                       out=jacobian_buffer()))),
    }
    if t > 1:
        # the same products on one thread, timed in rounds with the rest: the thread
        # speed-up then compares two timings taken under the same machine conditions
        for op, cls in (("GGN product", ghess.GGNLinearOperator),
                        ("Hessian product", ghess.HessianLinearOperator)):
            single = cls(model, loss, theta, data, mode="stored", n_threads=1)
            ops[f"ghess {op} (stored, 1 thread)"] = Op(op, lambda single=single: single @ v)
    counted = ghess_gemm_flops(model, s.X.shape[0])
    for name, entry in ops.items():
        key = name[len("ghess "):].replace(", 1 thread", "")
        if key in counted:
            ops[name] = entry._replace(flops=counted[key], flops_source="ghess (layers)")
    return ops


def numpy_competitor(s):
    """Return the pure-NumPy reference products of ``ghess.testing`` (batched, no cache)."""
    from ghess import testing

    args = (s.model, s.loss, s.theta, (s.X, s.y), s.v)
    return {"numpy GGN product": Op("GGN product", lambda: testing.reference_ggn_matvec(*args)),
            "numpy Hessian product": Op(
                "Hessian product", lambda: testing.reference_hessian_matvec(*args))}


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"PyTorch is not importable ({exc})") from None
    return torch


def with_torch_flops(torch, ops):
    """Count each operation's flops once with PyTorch's FlopCounterMode (not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    counted = {}
    for name, entry in ops.items():
        if entry.op == "per-sample Jacobians":  # reported as output GB/s
            counted[name] = entry
            continue
        try:
            with FlopCounterMode(display=False) as counter:
                entry.fn()
        except RuntimeError:
            # curvlinops' backward hooks do not run under the counter (torch 2.13): its
            # figures stay nominal; a genuine failure shows in the agreement check
            counted[name] = entry
            continue
        counted[name] = entry._replace(flops=counter.get_total_flops(),
                                       flops_source="PyTorch FlopCounterMode")
    return counted


def _torch_twin(s, torch):
    """Return the ``nn.Sequential`` twin of the model, its parameters set to theta."""
    from ghess import testing

    tdtype = {"float64": torch.float64, "float32": torch.float32}[s.theta.dtype.name]
    net = testing.torch_sequential(s.model, tdtype, params=s.theta)
    names = [name for name, _ in net.named_parameters()]
    if names != list(s.model.param_slots):  # theta's order is parameters()' order
        raise AssertionError(f"torch parameter order {names} differs from ghess's")
    return net


def torch_competitor(s):
    """Return torch.func transforms on the flat theta, and PyTorch's ordinary backward."""
    import numpy as np

    torch = _import_torch()
    torch.set_num_threads(s.threads)
    net = _torch_twin(s, torch)
    names = list(s.model.param_slots)
    shapes = [p.shape for p in net.parameters()]
    sizes = [int(np.prod(shape)) for shape in shapes]
    tX, ty, tXj = (torch.from_numpy(a) for a in (s.X, s.y, s.Xj))
    ttheta, tv = torch.from_numpy(s.theta.copy()), torch.from_numpy(s.v.copy())
    func = torch.func

    def unflatten(flat):
        return {n: p.reshape(sh) for n, p, sh in zip(names, flat.split(sizes), shapes)}

    def f(flat):
        return func.functional_call(net, unflatten(flat), (tX,))

    def objective(flat):
        return torch.nn.functional.cross_entropy(f(flat), ty, reduction="sum")

    def ggn():
        z, Jv = func.jvp(f, (ttheta,), (tv,))
        p = torch.softmax(z, dim=1)
        u = p * Jv - p * (p * Jv).sum(dim=1, keepdim=True)  # B_n Jv, B_n = diag(p) - p p^T
        return func.vjp(f, ttheta)[1](u)[0]

    grad_fn = func.grad(objective)

    def hvp():
        return func.jvp(grad_fn, (ttheta,), (tv,))[1]

    def loss_grad():
        # the ordinary PyTorch training step: module parameters, one backward
        for p in net.parameters():
            p.grad = None
        value = torch.nn.functional.cross_entropy(net(tX), ty, reduction="sum")
        value.backward()
        return value.item(), [p.grad for p in net.parameters()]

    def forward():
        with torch.no_grad():
            return net(tX)

    params = {name: p.detach() for name, p in net.named_parameters()}

    def single(params, x):
        return func.functional_call(net, params, (x[None],))[0]

    jacobians = func.vmap(func.jacrev(single), in_dims=(None, 0))
    n_jac, K = s.Xj.shape[0], s.model.n_outputs
    return with_torch_flops(torch, {
        "torch forward": Op("forward", forward),
        "torch loss+grad": Op("loss+grad", loss_grad, loss_grad_to_numpy),
        "torch.func GGN product": Op("GGN product", ggn),
        "torch.func Hessian product": Op("Hessian product", hvp),
        "torch.func Jacobian product": Op("Jacobian product",
                                          lambda: func.jvp(f, (ttheta,), (tv,))[1]),
        # a dict of (n, K, *shape) blocks; concatenated only for the agreement check
        "torch.func per-sample Jacobians": Op(
            "per-sample Jacobians", lambda: jacobians(params, tXj),
            lambda out: blocks_to_jacobians([out[n] for n in names], n_jac, K)),
    })


def jax_unflatten(model, flat):
    """Per layer, a dict of parameter arrays cut from the flat theta (as ghess does)."""
    params = [{} for _ in model.layers]
    for slot in model.param_slots.values():
        params[slot.layer_index][slot.attr] = flat[slot.start:slot.stop].reshape(slot.shape)
    return params


def jax_forward(model, params_list, x):
    """Apply ``model`` to the batch ``x`` (NCHW for conv nets) in JAX."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import ghess as G

    for layer, params in zip(model.layers, params_list):
        if isinstance(layer, G.Linear):
            x = x @ params["weight"].T
            if layer.bias:
                x = x + params["bias"]
        elif isinstance(layer, G.Conv2d):
            x = lax.conv_general_dilated(
                x, params["weight"], window_strides=layer.stride,
                padding=[(p, p) for p in layer.padding], rhs_dilation=layer.dilation,
                dimension_numbers=("NCHW", "OIHW", "NCHW"))
            if layer.bias:
                x = x + params["bias"][None, :, None, None]
        elif isinstance(layer, (G.MaxPool2d, G.AvgPool2d)):
            window, strides = (1, 1) + layer.kernel_size, (1, 1) + layer.stride
            padding = ((0, 0), (0, 0)) + tuple((p, p) for p in layer.padding)
            # concrete NumPy init values: JAX then uses its differentiable max/sum windows
            if isinstance(layer, G.MaxPool2d):  # padding counts as -inf, as in PyTorch
                x = lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, window,
                                      strides, padding)
            else:  # padded zeros count in the mean (count_include_pad=True)
                x = lax.reduce_window(x, np.array(0, x.dtype), lax.add, window, strides,
                                      padding) / (layer.kernel_size[0] * layer.kernel_size[1])
        elif isinstance(layer, G.Flatten):
            x = x.reshape(x.shape[0], -1)
        elif isinstance(layer, G.ReLU):
            x = jax.nn.relu(x)  # its derivative at 0 is 0, as in ghess
        elif isinstance(layer, G.LeakyReLU):
            x = jnp.where(x > 0, x, layer.negative_slope * x)
        elif isinstance(layer, G.Tanh):
            x = jnp.tanh(x)
        elif isinstance(layer, G.Sigmoid):
            x = jax.nn.sigmoid(x)
        elif isinstance(layer, G.Identity):
            pass
        else:
            raise NotImplementedError(f"jax_forward: no JAX equivalent for {layer!r}")
    return x


def jax_competitor(s):
    """Return the same operations under ``jax.jit``; each timed call blocks until ready."""
    try:
        import jax
    except ImportError as exc:
        raise Unavailable(f"JAX is not importable ({exc})") from None
    jax.config.update("jax_enable_x64", True)  # before any array: float64 stays float64
    import jax.numpy as jnp

    import ghess

    model = s.model
    theta, v, X, y, Xj = (jnp.asarray(a) for a in (s.theta, s.v, s.X, s.y, s.Xj))
    try:
        jax_forward(model, jax_unflatten(model, theta), X[:1])
    except NotImplementedError as exc:
        raise Unavailable(str(exc)) from None

    def f(flat, X):
        return jax_forward(model, jax_unflatten(model, flat), X)

    def objective(flat, X, y):
        logp = jax.nn.log_softmax(f(flat, X), axis=1)
        return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))

    def ggn(flat, vec, X):
        z, Jv = jax.jvp(lambda t: f(t, X), (flat,), (vec,))
        p = jax.nn.softmax(z, axis=1)
        u = p * Jv - p * jnp.sum(p * Jv, axis=1, keepdims=True)  # B_n Jv
        return jax.vjp(lambda t: f(t, X), flat)[1](u)[0]

    def hvp(flat, vec, X, y):
        return jax.jvp(lambda t: jax.grad(objective)(t, X, y), (flat,), (vec,))[1]

    def jvp(flat, vec, X):
        return jax.jvp(lambda t: f(t, X), (flat,), (vec,))[1]

    def single(params, x):
        return jax_forward(model, params, x[None])[0]

    def jacobians(params, X):
        return jax.vmap(jax.jacrev(single), in_axes=(None, 0))(params, X)

    def jacobians_by_sample(params, X):
        return jax.lax.map(lambda x: jax.jacrev(single)(params, x), X)

    jacobian_note = None
    if any(isinstance(layer, ghess.Conv2d) for layer in model.layers):
        # XLA:CPU runs vmap(jacrev) of our conv nets in time quadratic in the batch
        # (CNN-S, float64, 1 thread: 0.19 s for 8 samples, 3.6 s for 32, about a minute
        # for 128); a loop over samples is linear (0.7 s for 32).
        jacobians = jacobians_by_sample
        jacobian_note = ("jax.lax.map over samples of jacrev: vmap(jacrev) takes time "
                         "quadratic in the batch on conv nets (CNN-S: 3.6 s for 32 samples, "
                         "0.7 s with lax.map)")

    def timed(fn, *args):
        return jax.jit(fn).lower(*args).compile()

    def op(name, compiled, *args, to_numpy=None, note=None):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: a list
        flops = (cost or {}).get("flops")
        return Op(name, lambda: jax.block_until_ready(compiled(*args)), to_numpy, note,
                  flops if name != "per-sample Jacobians" else None, "XLA cost analysis")

    params = jax_unflatten(model, theta)
    slots = list(model.param_slots.values())
    n_jac, K = s.Xj.shape[0], model.n_outputs
    return {
        "JAX forward": op("forward", timed(f, theta, X), theta, X),
        "JAX loss+grad": op("loss+grad", timed(jax.value_and_grad(objective), theta, X, y),
                            theta, X, y, to_numpy=loss_grad_to_numpy),
        "JAX GGN product": op("GGN product", timed(ggn, theta, v, X), theta, v, X),
        "JAX Hessian product": op("Hessian product", timed(hvp, theta, v, X, y),
                                  theta, v, X, y),
        "JAX Jacobian product": op("Jacobian product", timed(jvp, theta, v, X), theta, v, X),
        # per layer, a dict of (n, K, *shape) blocks; concatenated only for the check
        "JAX per-sample Jacobians": op(
            "per-sample Jacobians", timed(jacobians, params, Xj), params, Xj,
            to_numpy=lambda out: blocks_to_jacobians(
                [out[sl.layer_index][sl.attr] for sl in slots], n_jac, K),
            note=jacobian_note),
    }


def curvlinops_competitor(s):
    """Return curvlinops' GGN and Hessian products with a torch vector (its fastest path)."""
    torch = _import_torch()
    try:
        import curvlinops
    except ImportError as exc:
        raise Unavailable(f"curvlinops is not importable ({exc})") from None
    torch.set_num_threads(s.threads)
    net = _torch_twin(s, torch)
    # parameters() is theta's order, and curvlinops flattens each one in C order
    args = (net, torch.nn.CrossEntropyLoss(reduction="sum"), list(net.parameters()),
            [(torch.from_numpy(s.X), torch.from_numpy(s.y))])
    kwargs = {"check_deterministic": False, "num_data": s.X.shape[0]}
    G = curvlinops.GGNLinearOperator(*args, **kwargs)
    H = curvlinops.HessianLinearOperator(*args, **kwargs)
    tv = torch.from_numpy(s.v.copy())
    return with_torch_flops(torch, {
        "curvlinops GGN product": Op("GGN product", lambda: G @ tv),
        "curvlinops Hessian product": Op("Hessian product", lambda: H @ tv)})


COMPETITORS = (("ghess", ghess_competitor), ("numpy", numpy_competitor),
               ("torch", torch_competitor), ("JAX", jax_competitor),
               ("curvlinops", curvlinops_competitor))


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


# -- measurements --------------------------------------------------------------------------
#: seconds of repeats per operation after its warm-up (--budget sets it in every worker)
BUDGET = 1.0


#: GEMM shapes (m, k, n) whose rate each library reaches: a dense layer of the MLPs and
#: the per-sample GEMMs of CNN-C's first and last convolutions
#: (op(a), op(b), m, k, n): the peak's shape; MLP-M's forward x W^T, weight gradient
#: g^T x and input gradient g W (its loss+grad's GEMMs); two conv im2col products
BLAS_SHAPES = (("N", "N", 1024, 784, 512), ("N", "T", 1024, 784, 512),
               ("T", "N", 512, 1024, 784), ("N", "N", 1024, 512, 512),
               ("N", "N", 32, 75, 1024), ("N", "N", 64, 576, 64))


def _operand_name(rows, cols, transposed):
    """Name a GEMM operand as the table does: ``rows x cols``, or the transpose it is stored as."""
    return f"({cols}x{rows})^T" if transposed else f"{rows}x{cols}"


def blas_rates(dtype):
    """GFLOP/s of NumPy's matmul, of the BLAS ghess calls and of torch.matmul, per shape.

    ghess calls the BLAS that SciPy ships (``scipy.linalg.cython_blas``); NumPy and
    PyTorch bring their own. The same GEMM can run at different rates in each, which
    no choice inside ghess's kernels changes. Timed in interleaved rounds; NumPy and
    ghess write into preallocated outputs, torch allocates its own as autograd's
    ``mm`` does.
    """
    import numpy as np

    from ghess._kernels import dense as _kernels

    try:
        torch = _import_torch()
    except Unavailable:
        torch = None
    rng = np.random.default_rng(2)
    rates = {}
    for op_a, op_b, m, k, n in BLAS_SHAPES:
        trans_a, trans_b = op_a == "T", op_b == "T"
        a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
        A, B = (a.T if trans_a else a), (b.T if trans_b else b)
        outputs = [np.empty((m, n), dtype=dtype) for _ in range(2)]

        def ghess_blas(a=a, b=b, c=outputs[0], ta=trans_a, tb=trans_b):
            _kernels.gemm_rowmajor(ta, tb, 1.0, a, b, 0.0, c, 1)

        fns = {"numpy": lambda A=A, B=B, c=outputs[1]: np.matmul(A, B, out=c),
               "ghess (SciPy's BLAS)": ghess_blas}
        if torch is not None:
            tA, tB = torch.from_numpy(A), torch.from_numpy(B)
            fns["torch"] = lambda tA=tA, tB=tB: torch.mm(tA, tB)
        timed = interleaved_times(fns, 7, budget=0.2)
        name = f"{_operand_name(m, k, trans_a)} @ {_operand_name(k, n, trans_b)}"
        rates[name] = {lib: 2 * m * k * n / t / 1e9 for lib, (t, _, _) in timed.items()}
    return rates


def gemm_one_thread(a, b, repeats):
    """Median time of ``a @ b`` with NumPy's BLAS held at one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return median_time(lambda: a @ b, repeats)[0]


def median_time(fn, min_repeats, budget=None):
    """Median wall time of ``fn()`` after a warm-up, and the number of runs."""
    import numpy as np

    budget = BUDGET if budget is None else budget
    t0 = time.perf_counter()
    fn()  # warm-up
    first = time.perf_counter() - t0
    # slow operations (the NumPy reference on CNNs) get fewer repeats, never below 3
    min_repeats = max(3, min(min_repeats, int(4 * budget / max(first, 1e-9))))
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget
                                       and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


#: seconds a multi-threaded worker idles before each library's turn in a round: longer
#: than any library's thread pool keeps spinning after its last call (OpenBLAS: 2^28
#: cycles, about 0.11 s here; libgomp and Eigen: milliseconds)
SETTLE = 0.2


def library(name):
    """Return the library of a timed operation: its name's first word ("ghess", "JAX")."""
    return name.split(" ", 1)[0]


def interleaved_times(fns, min_repeats, budget=None, settle=0.0):
    """Median wall time, runs and OS-kernel share of every ``fns[name]()``, interleaved.

    Each function is warmed up once; its number of runs is what ``median_time``
    would give it (at least ``min_repeats``, more within ``budget`` seconds, at most
    50, fewer for slow ones but never below 3). Round r then runs, in turn, every
    function that still has runs left. On a shared machine whose speed drifts over
    seconds, consecutive runs of one function would each see a different machine;
    interleaving makes every ratio compare timings taken under the same conditions.
    The kernel share is the process's system CPU time over the wall time of those
    runs: page faults of fresh allocations show there, not in the library's work.

    ``settle`` > 0 (multi-threaded workers): the functions of one library (``library``)
    run together in each round, after ``settle`` seconds of idling and one untimed
    call of that library's quickest function. The idling lets the previous library's
    thread pool stop spinning: with two threads on two cores, a pool still spinning
    takes a core from the next library (torch.func's GGN product after the NumPy
    reference's OpenBLAS calls: 115 -> 66 ms). The untimed call wakes the library's own
    pool and the idle core (the first call after 0.15 s of idling is 3-4 ms slower),
    as in a solver's loop, where one library's products run back to back.
    """
    import numpy as np

    budget = BUDGET if budget is None else budget
    runs, first_time = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up
        first = first_time[name] = max(time.perf_counter() - t0, 1e-9)
        floor = max(3, min(min_repeats, int(4 * budget / first)))
        runs[name] = max(floor, min(50, int(budget / first)))
    quickest = {}
    for name in fns:
        lib = library(name)
        if lib not in quickest or first_time[name] < first_time[quickest[lib]]:
            quickest[lib] = name
    times = {name: [] for name in fns}
    kernel = dict.fromkeys(fns, 0.0)
    for r in range(max(runs.values(), default=0)):
        previous = None
        for name, fn in fns.items():
            if r >= runs[name]:
                continue
            if settle > 0 and library(name) != previous:
                time.sleep(settle)
                fns[quickest[library(name)]]()
            previous = library(name)
            s0, t0 = os.times().system, time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            kernel[name] += os.times().system - s0
    return {name: (float(np.median(ts)), len(ts), kernel[name] / sum(ts))
            for name, ts in times.items()}


class PeakMemory:
    """Peak resident set size of this process while ``measure(fn)`` runs ``fn``."""

    def __init__(self, interval=5e-4):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)

    def rss(self):
        """Resident bytes now."""
        return int(os.pread(self._statm, 128, 0).split()[1]) * self.page

    @staticmethod
    def _reset_high_water_mark():
        """Reset the kernel's VmHWM to the current RSS; False where that is not allowed."""
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _high_water_mark():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def _release_free_heap():
        """Hand freed heap pages back to the OS, so that reuse does not hide a peak."""
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass

    def measure(self, fn):
        """Peak extra resident bytes during ``fn()`` over the resident size before it."""
        self._release_free_heap()
        hwm = self._reset_high_water_mark()
        before = peak = self.rss()
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, self.rss())
                stop.wait(self.interval)

        sampler = threading.Thread(target=sample, daemon=True)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(self.interval)  # let the sampler in while fn holds the GIL
        sampler.start()
        try:
            result = fn()
            peak = max(peak, self.rss())  # the result still counts
            del result
        finally:
            stop.set()
            sampler.join()
            sys.setswitchinterval(switch)
        if hwm:
            peak = max(peak, self._high_water_mark())
        return peak - before


def run_config(problem, dtype_name, threads, repeats, cores=None):
    """Benchmark one configuration in THIS process; return a dict of results."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator  # noqa: F401  (import cost outside timings)

    import ghess

    started = time.perf_counter()
    s = make_setup(problem, dtype_name, threads)
    model, dtype = s.model, s.theta.dtype
    F = forward_flops(model, s.X.shape[0])
    n_jac = s.Xj.shape[0]
    results = {"problem": problem, "dtype": dtype_name, "threads": threads, "cores": cores,
               "n_params": model.n_params, "batch": s.X.shape[0],
               "conv": any(isinstance(layer, ghess.Conv2d) for layer in model.layers),
               "forward_flops": F, "jacobian_samples": n_jac,
               "jacobian_bytes": n_jac * model.n_outputs * model.n_params * dtype.itemsize,
               "timings": {}, "repeats": {}, "kernel_share": {}, "operations": {}, "flops": {},
               "flops_source": {}, "peak_memory_mib": {}, "agreement": {}, "skipped": {}}

    tol = 1e-10 if dtype == np.float64 else 1e-3

    def relative_error(value, ref):
        if isinstance(ref, tuple):  # (loss, gradient): the worse of the two
            return max(relative_error(a, b) for a, b in zip(value, ref))
        return float(np.linalg.norm(np.subtract(value, ref)) / np.linalg.norm(ref))

    def agree(name, value, ref):
        rel = relative_error(value, ref)
        results["agreement"][name] = rel
        if not rel <= tol:
            raise AssertionError(f"{name} disagrees with ghess: relative error {rel:.2e}")

    # every competitor is set up and checked against ghess before anything is timed
    ops, refs = {}, {}
    for label, competitor in COMPETITORS:
        try:
            entries = competitor(s)
        except Unavailable as exc:
            results["skipped"][label] = str(exc)
            continue
        for name, entry in entries.items():
            if entry.op in UNCHECKED_OPS:
                continue
            value = (entry.to_numpy or to_numpy)(entry.fn())
            if entry.op in refs:
                agree(name, value, refs[entry.op])
            else:
                refs[entry.op] = value
        ops.update(entries)
    results["notes"] = {name: entry.note for name, entry in ops.items() if entry.note}
    results["versions"] = competitor_versions()

    # the machine's GEMM throughput on a 1024 x 784 x 512 product, measured before and
    # after the timed rounds; the faster of the two is the peak (this VM's speed drifts,
    # and a low reading would flatter every "fraction of peak")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1024, 784)).astype(dtype)
    b = rng.normal(size=(784, 512)).astype(dtype)
    # (with 2 threads each measurement below starts once the last library's pool idles)
    settle = SETTLE if threads > 1 else 0.0
    time.sleep(settle)
    t_gemm, _ = median_time(lambda: a @ b, repeats)
    # with 2 threads, the same GEMM on 1: what the machine itself gains from the second
    # core in this worker (a core taken by another tenant shows here, not only in ghess)
    t_gemm_1 = gemm_one_thread(a, b, repeats) if threads > 1 else None
    # per core only: with 2 threads each library's pool would compete with the others'
    # still-spinning OpenMP pools, and the figures measured that contention (1-2 GFLOP/s)
    results["blas_rates"] = blas_rates(dtype) if threads == 1 else {}

    # builds (seconds each on big problems) are timed on their own; the rest interleaved
    builds = {name: entry.fn for name, entry in ops.items() if entry.op in UNCHECKED_OPS}
    time.sleep(settle)
    timed = {name: median_time(fn, 3) + (None,) for name, fn in builds.items()}
    timed.update(interleaved_times({name: entry.fn for name, entry in ops.items()
                                    if name not in builds}, repeats, settle=settle))
    time.sleep(settle)
    t_gemm = min(t_gemm, median_time(lambda: a @ b, repeats)[0])
    results["gemm_gflops"] = 2 * 1024 * 784 * 512 / t_gemm / 1e9
    if t_gemm_1 is not None:
        t_gemm_1 = min(t_gemm_1, gemm_one_thread(a, b, repeats))
        results["gemm_gflops_1thread"] = 2 * 1024 * 784 * 512 / t_gemm_1 / 1e9
    for name, entry in ops.items():
        (results["timings"][name], results["repeats"][name],
         results["kernel_share"][name]) = timed[name]
        results["operations"][name] = entry.op
        if entry.flops is not None:
            results["flops"][name] = entry.flops
            results["flops_source"][name] = entry.flops_source
        elif entry.op in FLOPS_PER_FORWARD:
            results["flops"][name] = FLOPS_PER_FORWARD[entry.op] * F
            results["flops_source"][name] = "nominal"

    gc.collect()  # once: 0.2 s a call with torch and JAX loaded; refcounts free the rest
    memory = PeakMemory()
    for name, entry in ops.items():
        results["peak_memory_mib"][name] = memory.measure(entry.fn) / 2**20
    results["elapsed"] = time.perf_counter() - started
    return results


# -- report --------------------------------------------------------------------------------
def judge(res, target):
    """Judge ``target`` in one result: None when not measured, else a dict.

    ``ratio`` is the fastest rival's time over ghess's, ``rival`` that rival's entry,
    and ``pass`` None where the target does not apply (NumPy targets on dense nets).
    """
    t = res["timings"]
    mine = GHESS_MAIN[target.op]
    rivals = [f"{rival} {target.op}" for rival in target.rivals]
    rivals = [name for name in rivals if name in t]
    if mine not in t or not rivals:
        return None
    fastest = min(rivals, key=t.get)
    ratio = t[fastest] / t[mine]
    applies = res["conv"] or not target.conv_only
    return {"ratio": ratio, "rival": fastest, "required": target.ratio,
            "pass": ratio >= target.ratio if applies else None}


def target_cell(verdict):
    """``'2.31x PASS'``; no mark where the target does not apply, ``n/a`` if not measured."""
    if verdict is None:
        return "n/a"
    mark = {True: " PASS", False: " FAIL", None: ""}[verdict["pass"]]
    return f"{verdict['ratio']:.2f}x{mark}"


def thread_scaling(all_results):
    """Rows (problem, dtype, op, speed-up, machine's GEMM speed-up) from 1 to 2 threads.

    Both of ghess's timings come from the 2-thread worker, where the 1-thread
    products are timed in the same rounds as the 2-thread ones; the last column
    is the 1024 x 784 x 512 GEMM's 2-thread rate over its 1-thread rate in that
    worker (None if not measured).
    """
    rows = []
    for res in all_results:
        if res["threads"] != 2:
            continue
        t = res["timings"]
        one_thread_gemm = res.get("gemm_gflops_1thread")
        machine = res["gemm_gflops"] / one_thread_gemm if one_thread_gemm else None
        for op in SCALING_OPS:
            two, one = GHESS_MAIN[op], f"ghess {op} (stored, 1 thread)"
            if one in t and two in t:
                rows.append((res["problem"], res["dtype"], op, t[one] / t[two], machine))
    return rows


def counted_flops(res, name):
    """Return the flops counted for operation ``name``, None if only nominal (or none)."""
    if res.get("flops_source", {}).get(name, "nominal") == "nominal":
        return None
    return res["flops"][name]


def flop_ratio(res, mine, rival):
    """Return the rival's counted flops over ghess's: the speed-up at equal GEMM efficiency."""
    mine_flops, rival_flops = counted_flops(res, mine), counted_flops(res, rival)
    if mine_flops is None or rival_flops is None:
        return None
    return rival_flops / mine_flops


def peak_lines(all_results):
    """Return a table of every missed GGN/Hessian/loss+grad target against the GEMM peak.

    ``needed`` is the rate ghess would have to sustain over its own counted flops
    to meet the target against that run's fastest rival; ``peak`` is the GEMM rate
    measured in the same worker (1024x784 @ 784x512). A need above 100% of the peak
    cannot be met with ghess's flop count on this machine.
    """
    rows = []
    for res in all_results:
        peak = res.get("gemm_gflops")
        for target in TARGETS[:3]:
            verdict = judge(res, target)
            if not peak or verdict is None or verdict["pass"] is not False:
                continue
            mine, rival, t = GHESS_MAIN[target.op], verdict["rival"], res["timings"]
            mine_flops, rival_flops = counted_flops(res, mine), counted_flops(res, rival)
            if mine_flops is None:
                continue
            have = mine_flops / t[mine] / 1e9
            need = target.ratio * mine_flops / t[rival] / 1e9
            rival_rate = None if rival_flops is None else rival_flops / t[rival] / 1e9
            cells = [f"{rate:.1f} ({rate / peak:.0%})" if rate is not None else "n/a"
                     for rate in (have, need, rival_rate)]
            rows.append(f"| {res['problem']} | {res['dtype']} | {res['threads']} | {target.op} "
                        f"| {rival} | " + " | ".join(cells) + f" | {peak:.1f} |")
    if not rows:
        return []
    return ["", "Missed targets against the machine's GEMM peak (GFLOP/s over each "
            "implementation's counted flops; % of the GEMM rate measured in the same worker). "
            "\"needed\" is what ghess would have to sustain to meet the target; above 100% "
            "it cannot be met with ghess's flop count on this machine.", "",
            "| problem | dtype | threads | operation | fastest rival | ghess | needed "
            "| rival | GEMM peak |", "|---|---|---:|---|---|---:|---:|---:|---:|"] + rows


def summary_lines(all_results):
    """Return the SUMMARY section: every target, one row per configuration."""
    lines = ["## SUMMARY", "",
             "Ratios are competitor time / ghess time (>1: ghess is faster); \"best\" is the "
             "fastest of torch.func, JAX and curvlinops in that run. A NumPy target applies "
             "to conv nets only; n/a: the competitor did not run.", "",
             "| problem | dtype | threads | " + " | ".join(t.column for t in TARGETS) + " |",
             "|---|---|---:|" + "---:|" * len(TARGETS)]
    met = total = 0
    for res in all_results:
        verdicts = [judge(res, target) for target in TARGETS]
        met += sum(v is not None and v["pass"] is True for v in verdicts)
        total += sum(v is not None and v["pass"] is not None for v in verdicts)
        lines.append(f"| {res['problem']} | {res['dtype']} | {res['threads']} | "
                     + " | ".join(map(target_cell, verdicts)) + " |")
    lines += ["", "Counted flops of the fastest rival over ghess's (PyTorch's FlopCounterMode, "
              "XLA's cost analysis, ghess's layer count): the speed-up each product would "
              "show at equal GEMM efficiency.", "",
              "| problem | dtype | threads | GGN: rival, flop ratio "
              "| Hessian: rival, flop ratio |",
              "|---|---|---:|---|---|"]
    for res in all_results:
        cells = []
        for target in TARGETS[:2]:
            verdict = judge(res, target)
            ratio = None if verdict is None else flop_ratio(res, GHESS_MAIN[target.op],
                                                            verdict["rival"])
            cells.append("n/a" if ratio is None else f"{verdict['rival']}, {ratio:.2f}")
        lines.append(f"| {res['problem']} | {res['dtype']} | {res['threads']} | "
                     + " | ".join(cells) + " |")
    lines += peak_lines(all_results)
    scaling = thread_scaling(all_results)
    lines += ["", "ghess 1 -> 2 thread speed-up, both timed in the 2-thread worker "
              f"(target >= {SCALING_TARGET}x on "
              f"{', '.join(SCALING_PROBLEMS)}):", ""]
    if scaling:
        lines += ["| problem | dtype | product | speed-up | machine's GEMM 1 -> 2 | status |",
                  "|---|---|---|---:|---:|---|"]
        for problem, dtype, op, speedup, machine in scaling:
            status = "—"
            if problem in SCALING_PROBLEMS:
                status = "PASS" if speedup >= SCALING_TARGET else "FAIL"
                met += status == "PASS"
                total += 1
            gemm = "n/a" if machine is None else f"{machine:.2f}x"
            lines.append(f"| {problem} | {dtype} | {op} | {speedup:.2f}x | {gemm} | {status} |")
    else:
        lines.append("(not measured: no problem ran with 2 threads)")
    lines += ["", f"**Targets met: {met} of {total}.**", ""]
    return lines


def config_lines(res):
    """One configuration's timings, rates, memory, comparisons and agreement."""
    t, gemm = res["timings"], res["gemm_gflops"]
    n_jac = res["jacobian_samples"]
    jac_note = ("the whole batch" if n_jac == res["batch"]
                else f"the first {n_jac} samples (a sub-batch: the whole batch's "
                     "Jacobians exceed 2 GiB)")
    lines = [f"## {res['problem']}, {res['dtype']}, {res['threads']} thread(s)", "",
             f"Batch {res['batch']}, {res['n_params']} parameters, forward GEMM work "
             f"F = {res['forward_flops'] / 1e6:.4g} MFLOP; GEMM {gemm:.1f} GFLOP/s on "
             f"core(s) {res['cores']}. Per-sample Jacobians on {jac_note}, "
             f"{res['jacobian_bytes'] / 2**20:.3g} MiB of output."]
    rates = res.get("blas_rates")
    if rates:
        libraries = list(next(iter(rates.values())))
        lines += ["", "GEMM rates (GFLOP/s) of each library on the same operands, one core:",
                  "",
                  "| GEMM | " + " | ".join(libraries) + " |",
                  "|---|" + "---:|" * len(libraries)]
        for shape, by_library in rates.items():
            lines.append(f"| {shape} | "
                         + " | ".join(f"{by_library[name]:.1f}" for name in libraries) + " |")
        lines.append("")
    for label, reason in res["skipped"].items():
        lines.append(f"Skipped {label}: {reason}.")
    for name, note in res.get("notes", {}).items():
        lines.append(f"{name}: {note}.")
    lines += ["", "| operation | median (ms) | runs | MFLOP (* nominal) | % of GEMM peak "
              "(Jacobians: output GB/s) | peak extra RSS (MiB) | % in OS kernel |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    kernel_share = res.get("kernel_share", {})
    sources = res.get("flops_source", {})
    for name, seconds in t.items():
        flops = res["flops"].get(name)
        if flops is not None:
            mark = "*" if sources.get(name, "nominal") == "nominal" else ""
            nominal = f"{flops / 1e6:.4g}{mark}"
            rate = f"{100 * flops / (seconds * gemm * 1e9):.1f}%"
        elif res["operations"][name] == "per-sample Jacobians":
            nominal, rate = "—", f"{res['jacobian_bytes'] / seconds / 1e9:.2f} GB/s"
        else:
            nominal, rate = "—", "—"
        share = kernel_share.get(name)
        lines.append(f"| {name} | {1e3 * seconds:.3f} | {res['repeats'][name]} | {nominal} | "
                     f"{rate} | {res['peak_memory_mib'][name]:.2f} | "
                     f"{'—' if share is None else f'{100 * share:.0f}%'} |")
    lines += ["", "| ghess operation | competitor | ghess (ms) | competitor (ms) | "
              "ratio (competitor / ghess) | flop ratio | target |",
              "|---|---|---:|---:|---:|---:|---|"]

    def flops_cell(mine, name):
        ratio = flop_ratio(res, mine, name)
        return "—" if ratio is None else f"{ratio:.2f}"

    for op, mine in GHESS_MAIN.items():
        if mine not in t:
            continue
        for name, other_op in res["operations"].items():
            if other_op == op and name != mine:
                lines.append(f"| {mine} | {name} | {1e3 * t[mine]:.3f} | {1e3 * t[name]:.3f} "
                             f"| {t[name] / t[mine]:.2f}x | {flops_cell(mine, name)} | |")
    for target in TARGETS:
        verdict = judge(res, target)
        if verdict is None or verdict["pass"] is None:
            continue
        mine, fastest = GHESS_MAIN[target.op], verdict["rival"]
        rival = (fastest if len(target.rivals) == 1
                 else f"fastest of {' / '.join(target.rivals)}: {fastest}")
        lines.append(f"| {mine} | {rival} | {1e3 * t[mine]:.3f} | {1e3 * t[fastest]:.3f} | "
                     f"{verdict['ratio']:.2f}x | {flops_cell(mine, fastest)} | "
                     f">= {target.ratio}x: "
                     f"{'PASS' if verdict['pass'] else 'FAIL'} |")
    lines += ["", "Agreement with ghess (relative 2-norm): " + ", ".join(
        f"{k} {v:.1e}" for k, v in res["agreement"].items()), ""]
    return lines


def machine_info(all_results):
    """CPU, cores, versions and BLAS of this machine (competitor versions from the runs)."""
    import platform

    import numpy as np
    import scipy
    from threadpoolctl import threadpool_info

    import ghess

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "numpy": np.__version__,
            "scipy": scipy.__version__, "ghess": ghess.__version__,
            "blas": sorted({f"{i.get('internal_api')} {i.get('version')}"
                            for i in threadpool_info() if i.get("user_api") == "blas"})}
    for package in ("torch", "jax", "jaxlib", "curvlinops"):
        info[package] = next((r["versions"][package] for r in all_results
                              if package in r["versions"]), "not available")
    return info


METHOD = """\
Times are medians after a warm-up (ms). Every implementation runs in the same process on the
same weights, data and vectors, after a check that it agrees with ghess. The operations are
timed in interleaved rounds (each round runs every operation once, slow ones for fewer
rounds), so that a drift in the machine's speed, large on this shared VM, hits ghess and its
rivals alike; the operator builds are timed separately. With 2 threads, each library's
operations run together in a round, after 0.2 s of idling and one untimed call of its quickest
operation: a thread pool still spinning after one library's last call would otherwise take a
core from the next library (in the runs before this change, torch.func's products came right
after the NumPy reference's OpenBLAS calls, and timed up to 2x slower). The 1 -> 2 thread
speed-up compares ghess's 2-thread products with 1-thread twins timed in the same rounds of
the 2-thread worker; next to it, the machine's own: the 1024 x 784 x 512 GEMM's rate with 2
threads over its rate with 1, both in that worker (a core taken by another tenant of the VM
shows there).
Each worker process is restricted to `threads` CPU cores with `sched_setaffinity`, which
binds every library's thread pool alike, including XLA's (JAX 0.10 has no flag for the size of
its CPU thread pool; `intra_op_parallelism_threads` is not an XLA flag). With 1 thread, JAX
also runs with `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`; OpenMP and BLAS get the thread
count through their environment variables and PyTorch through `torch.set_num_threads`.

Flops are counted per implementation: ghess's from its layers (`ghess_gemm_flops`: GEMMs
and the contractions with the stored factors), PyTorch's, torch.func's and curvlinops' by
`torch.utils.flop_counter.FlopCounterMode`, JAX's by XLA's cost analysis of the compiled
function (after XLA's own simplifications). The NumPy reference has no counter: its figures
(marked *) are nominal multiples of F, the GEMM flops of one forward pass (forward F,
loss+grad 3F, GGN product 2F, Hessian product 6F). The percentage of the GEMM peak (a
1024 x 784 x 512 GEMM timed in the same worker before and after the rounds, the faster
kept) is then each implementation's own efficiency,
and the flop ratio (rival's flops / ghess's) is the speed-up ghess would show if both ran at
the same efficiency. Per-sample Jacobians report their output rate in GB/s. torch.func
and JAX produce them as one block per parameter tensor; the concatenation into one array is
not timed. "torch loss+grad" is PyTorch's ordinary `loss.backward()` on the module.

Peak extra RSS: after all timings each operation runs once more while a thread samples the
resident set size every 0.5 ms (and the kernel's high-water mark, reset before the call where
Linux allows it); reported is the peak minus the resident size just before the call, after
freed heap memory was returned to the OS.

% in OS kernel: the process's system CPU time over the wall time of an operation's timed
runs (all threads). It is the cost of page faults on fresh allocations: on this VM a freshly
touched page may also have to be supplied by the hypervisor, so an operation that writes a new
multi-hundred-MiB array (per-sample Jacobians) can spend most of its time there. "ghess
per-sample Jacobians (out=)" writes into one buffer reused across calls, which the API offers;
the rivals' APIs allocate a new output on every call.
"""


def write_report(infos, all_results, path_md, path_json, title):
    """SUMMARY, machine info, then one section per configuration; and the JSON."""
    summary = {"targets": [dict({"problem": r["problem"], "dtype": r["dtype"],
                                 "threads": r["threads"]},
                                **{t.column: judge(r, t) for t in TARGETS})
                           for r in all_results],
               "thread_scaling": [
                   {"problem": problem, "dtype": dtype, "op": op, "speedup": speedup,
                    "machine_gemm_speedup": machine,
                    "pass": speedup >= SCALING_TARGET if problem in SCALING_PROBLEMS else None}
                   for problem, dtype, op, speedup, machine in thread_scaling(all_results)]}
    with open(path_json, "w") as fh:
        json.dump({"machine": infos, "summary": summary, "results": all_results}, fh, indent=1)
    lines = [f"# {title}", "",
             f"Generated by `python bench/run.py` on {time.strftime('%Y-%m-%d')}.", ""]
    lines += summary_lines(all_results)
    lines += ["## Machine", ""] + [f"- {key}: {value}" for key, value in infos.items()]
    lines += ["", "## Method", "", METHOD]
    for res in all_results:
        lines += config_lines(res)
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def run_worker(problem, dtype, threads, repeats, budget):
    """Spawn one configuration's worker; return its result dict."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + " --xla_cpu_multi_thread_eigen=false").strip()
    proc = subprocess.run(
        [sys.executable, __file__, "--repeats", str(repeats), "--budget", str(budget),
         "--worker", problem, dtype, str(threads)],
        env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(proc.returncode)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    global BUDGET
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+",
                        default=["MLP-S", "MLP-M", "MLP-M-tanh", "CNN-S", "CNN-C"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=BUDGET,
                        help="seconds of timed repeats per operation (at least --repeats runs)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny problems only, float64, 1 thread")
    parser.add_argument("--output", default=HERE, help="directory for the report")
    parser.add_argument("--worker", nargs=3, metavar=("PROBLEM", "DTYPE", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()

    BUDGET = args.budget
    if args.worker:
        threads = int(args.worker[2])
        cores = pin_to_cores(threads)  # before numpy, torch or JAX start their threads
        result = run_config(args.worker[0], args.worker[1], threads, args.repeats, cores)
        print("RESULT " + json.dumps(result))
        return 0

    if args.quick:
        args.problems, args.dtypes, args.threads, args.repeats = (["tiny", "tiny-cnn"],
                                                                  ["float64"], [1], 3)
    os.makedirs(args.output, exist_ok=True)
    all_results = []
    for problem in args.problems:
        for dtype in args.dtypes:
            for threads in args.threads:
                result = run_worker(problem, dtype, threads, args.repeats, args.budget)
                all_results.append(result)
                verdicts = [judge(result, target) for target in TARGETS]
                passes = [v["pass"] for v in verdicts if v is not None and v["pass"] is not None]
                met, judged = sum(passes), len(passes)
                ggn = result["timings"]["ghess GGN product (stored)"]
                print(f"{problem:11s} {dtype:8s} {threads} thr: GGN {1e3 * ggn:8.3f} ms, "
                      f"targets met {met}/{judged}, {result['elapsed']:.0f} s", flush=True)
                # after every configuration: an interrupted run keeps what it measured
                name = "RESULTS_quick" if args.quick else "RESULTS"
                title = "ghess benchmark results" + (" (--quick)" if args.quick else "")
                write_report(machine_info(all_results), all_results,
                             os.path.join(args.output, name + ".md"),
                             os.path.join(args.output, name.lower() + ".json"), title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
