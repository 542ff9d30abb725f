"""Pure-NumPy reference implementations and finite-difference checkers.

Everything here is slow and written to be obviously correct: one sample at a
time, one layer at a time, in float64, with the mathematics spelled out. It is
deliberately independent of the fast engine: it reads only the *specs* of the
model (``model.layers``, ``model.param_slots``, ``model.unflatten``) and of the
loss (its type, ``reduction`` and ``factor``), never the Cython kernels or the operators.
Use it to test the fast path, and for small problems where speed does not
matter.

Notation: sample ``n`` has input ``x_n`` and network output ``z_n`` (K,); the
loss is ``L = c * sum_n l(z_n, y_n)`` with ``c = f`` for ``reduction="sum"``
and ``c = f/(N K)`` (MSE, BCE) or ``f/N`` (cross-entropy) for ``"mean"``
(``f`` the loss's ``factor``, 1 by default),
where N counts the samples of all batches together. ``r_n = c dl/dz_n`` and
``B_n = c d^2l/dz_n^2``; ``J_n = dz_n/dtheta`` (K, n_params).

- forward / loss / gradient: per-sample forward pass and plain backprop;
- per-sample Jacobians: back-propagate each output unit vector e_k;
- GGN: ``sum_n J_n^T B_n J_n`` built densely;
- Hessian: exact, one column per parameter direction e_j by Pearlmutter's
  R-operator (forward-mode differentiation of the backprop of one sample);
- finite differences: central, 2nd or 4th order, for scalar, vector and
  gradient functions (``finite_differences``);
- ``assert_allclose_rel``, a norm-wise relative comparison (``assertions``);
- ``torch_sequential``, the equivalent PyTorch model (``ghess.interop.torch``).

Layers: ``Linear``, the elementwise activations, and the convolutional layers
``Conv2d``, ``MaxPool2d``, ``AvgPool2d`` and ``Flatten`` (PyTorch semantics);
an activation defined outside ghess is taught to the reference with
``register_reference_activation``.
Activations keep their per-sample shape (``model.shapes[i]``): ``(C, H, W)``
between convolutional layers, so inputs are ``(N, *model.input_shape)``. The
convolution and the poolings are direct sums over kernel offsets (no im2col);
max-pooling routes every derivative, and every R{.} quantity, to the first
maximum of its window in row-major order, as PyTorch does.

Examples
--------
>>> import numpy as np
>>> import ghess
>>> from ghess import testing
>>> model = ghess.Sequential(ghess.Linear(3, 2), ghess.Tanh(), ghess.Linear(2, 2),
...                          input_shape=(3,))
>>> theta = model.init_params(seed=0)
>>> X = np.ones((4, 3)); y = np.array([0, 1, 1, 0])
>>> value, grad = testing.reference_loss_and_grad(model, ghess.CrossEntropyLoss(), theta,
...                                              (X, y))
>>> fd = testing.finite_difference_gradient(
...     lambda t: testing.reference_loss(model, ghess.CrossEntropyLoss(), t, (X, y)), theta)
>>> testing.assert_allclose_rel(grad, fd, rtol=1e-8)
"""

from ..interop.torch import torch_sequential
from .assertions import assert_allclose_rel
from .finite_differences import (
    finite_difference_gradient,
    finite_difference_hvp,
    finite_difference_jvp,
)
from .reference import (
    reference_ekfac,
    reference_empirical_fisher,
    reference_fisher_mc,
    reference_forward,
    reference_ggn,
    reference_ggn_matvec,
    reference_hessian,
    reference_hessian_matvec,
    reference_kfac,
    reference_loss,
    reference_loss_and_grad,
    reference_per_sample_jacobians,
    register_reference_activation,
)

__all__ = [
    "reference_forward",
    "reference_loss",
    "reference_loss_and_grad",
    "reference_per_sample_jacobians",
    "reference_ggn",
    "reference_empirical_fisher",
    "reference_ekfac",
    "reference_fisher_mc",
    "reference_kfac",
    "reference_hessian",
    "reference_ggn_matvec",
    "reference_hessian_matvec",
    "register_reference_activation",
    "finite_difference_gradient",
    "finite_difference_jvp",
    "finite_difference_hvp",
    "assert_allclose_rel",
    "torch_sequential",
]
