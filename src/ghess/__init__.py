"""ghess: exact curvature of neural-network losses as SciPy LinearOperators.

Per-sample Jacobians, the generalized Gauss-Newton matrix and the exact Hessian
of dense and convolutional networks, computed by Cython kernels over BLAS and exposed as
``scipy.sparse.linalg.LinearOperator`` objects for ``cg``, ``minres``,
``eigsh``, ``lobpcg`` and ``lsmr``.
"""

from . import analysis, testing
from ._config import release_memory, show_config
from ._version import __version__
from .analysis import (
    bottom_eigenvalues,
    ggn_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
from .functional import loss_and_grad, per_sample_jacobians
from .interop.sklearn import from_sklearn
from .interop.torch import from_torch, to_torch
from .nn import (
    ELU,
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    BCEWithLogitsLoss,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    MaxPool2d,
    MSELoss,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)
from .operators import (
    EKFACLinearOperator,
    EmpiricalFisherLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    InverseLinearOperator,
    JacobianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from .optim import NewtonCG, StepRecord

__all__ = [
    "Sequential",
    "from_torch",
    "from_sklearn",
    "to_torch",
    "Linear",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "GELU",
    "SiLU",
    "ELU",
    "Dropout",
    "Identity",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Flatten",
    "Residual",
    "MSELoss",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "loss_and_grad",
    "per_sample_jacobians",
    "EKFACLinearOperator",
    "EmpiricalFisherLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "HessianLinearOperator",
    "InverseLinearOperator",
    "JacobianLinearOperator",
    "KFACInverseLinearOperator",
    "KFACLinearOperator",
    "NewtonCG",
    "StepRecord",
    "top_eigenvalues",
    "bottom_eigenvalues",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "ggn_diagonal",
    "spectral_density",
    "plot_spectral_density",
    "analysis",
    "testing",
    "nn",
    "show_config",
    "release_memory",
    "__version__",
]
