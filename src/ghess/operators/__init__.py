"""Curvature and Jacobian operators as ``scipy.sparse.linalg.LinearOperator`` objects.

- ``base``: the loop over chunks and its reduction, mode and memory planning,
  damping, ``block`` and ``todense``;
- ``ggn``: :class:`GGNLinearOperator`; ``hessian``: :class:`HessianLinearOperator`;
  ``jacobian``: :class:`JacobianLinearOperator`; ``fisher``:
  :class:`EmpiricalFisherLinearOperator`.
"""

from .base import ChunkedOperator, CurvatureOperator
from .fisher import EmpiricalFisherLinearOperator, FisherMCLinearOperator
from .ggn import GGNLinearOperator
from .hessian import HessianLinearOperator
from .inverse import InverseLinearOperator
from .jacobian import JacobianLinearOperator
from .kfac import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

__all__ = [
    "ChunkedOperator",
    "CurvatureOperator",
    "EKFACLinearOperator",
    "EmpiricalFisherLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "HessianLinearOperator",
    "InverseLinearOperator",
    "JacobianLinearOperator",
    "KFACInverseLinearOperator",
    "KFACLinearOperator",
]
