"""The propagation engine: chunk-level passes through a Sequential.

- ``plan``: what follows from the model's structure alone, cached per model
  and dtype (parametrised layers, factor places, Hessian steps, memory per
  sample, the chunk-size rule);
- ``passes``: tangents, accumulators, and the first-order passes (J v, J^T u);
- ``factors``: the stored per-sample Jacobian factors and the products from them;
- ``hessian``: the gradient trace and the R-operator backward of Hessian products;
- ``fused``: steps that run two layers as one (activation + max-pooling).

Everything here works on one chunk of samples; the operators
(``ghess.operators``) own the loop over chunks and the reduction.
"""

from .factors import (
    ChunkFactors,
    factor_ggn,
    factor_jvp,
    factor_sample_jacobians,
    factor_vjp,
    jacobian_factors,
)
from .hessian import GradientTrace, gradient_trace, hvp_chunk
from .passes import (
    Accumulators,
    accumulators_to_flat,
    check_finite_result,
    checked_forward,
    checked_loss,
    jvp_chunk,
    new_accumulators,
    prepare_tangents,
    vjp_chunk,
)
from .plan import CHUNK_BYTES, Plan, chunk_count, chunk_size_for, plan_for

__all__ = [
    "Accumulators",
    "CHUNK_BYTES",
    "ChunkFactors",
    "GradientTrace",
    "Plan",
    "accumulators_to_flat",
    "check_finite_result",
    "checked_forward",
    "checked_loss",
    "chunk_count",
    "chunk_size_for",
    "factor_ggn",
    "factor_jvp",
    "factor_sample_jacobians",
    "factor_vjp",
    "gradient_trace",
    "hvp_chunk",
    "jacobian_factors",
    "jvp_chunk",
    "new_accumulators",
    "plan_for",
    "prepare_tangents",
    "vjp_chunk",
]
