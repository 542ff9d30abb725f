"""ghess: exact curvature of neural-network losses as SciPy LinearOperators.

Per-sample Jacobians, the generalized Gauss-Newton matrix and the exact Hessian
of dense networks, computed by Cython kernels over BLAS and exposed as
``scipy.sparse.linalg.LinearOperator`` objects for ``cg``, ``minres``,
``eigsh``, ``lobpcg`` and ``lsmr``.
"""

__version__ = "0.1.0"

from . import analysis
from ._config import release_memory, show_config
from .analysis import (
    bottom_eigenvalues,
    ggn_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    top_eigenvalues,
)
from .conv import AvgPool2d, Conv2d, Flatten, MaxPool2d
from .functional import loss_and_grad, per_sample_jacobians
from .ggn import GGNLinearOperator
from .hessian import HessianLinearOperator
from .jacobian import JacobianLinearOperator
from .layers import Identity, LeakyReLU, Linear, ReLU, Sigmoid, Softplus, Tanh
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .model import Sequential
from .optim import NewtonCG, StepRecord

__all__ = [
    "Sequential",
    "Linear",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "Identity",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "Flatten",
    "MSELoss",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "loss_and_grad",
    "per_sample_jacobians",
    "GGNLinearOperator",
    "HessianLinearOperator",
    "JacobianLinearOperator",
    "NewtonCG",
    "StepRecord",
    "top_eigenvalues",
    "bottom_eigenvalues",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "ggn_diagonal",
    "spectral_density",
    "analysis",
    "show_config",
    "release_memory",
    "__version__",
]
