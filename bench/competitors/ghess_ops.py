"""ghess's operations; each operation's ghess entry is the reference the others must match.

Forward, loss+grad, GGN and Hessian products in stored and recompute mode, the GGN
matmat with 16 columns, Jacobian products, per-sample Jacobians, the operator
builds, KFAC's build (compared through its product with v), product and inverse
product, each with the flops counted from the layers (:mod:`bench.flops`).
"""

import functools

from ..flops import ghess_gemm_flops
from .common import KFAC_DAMPING, Op, loss_grad_to_numpy


def competitor(s):
    """Return ghess's operations; each operation's first entry is the reference."""
    import numpy as np

    import ghess

    model, loss, theta, data, t = s.model, s.loss, s.theta, (s.X, s.y), s.threads

    def operator(cls, mode):
        return cls(model, loss, theta, data, mode=mode, n_threads=t)

    # built once, on first use: only the operations asked for (``s.ops``) build theirs
    G, Gr, H, Hr = (functools.cache(functools.partial(operator, cls, mode))
                    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator)
                    for mode in ("stored", "recompute"))
    EF = functools.cache(functools.partial(operator, ghess.EmpiricalFisherLinearOperator,
                                           "stored"))
    J = functools.cache(lambda: ghess.JacobianLinearOperator(model, theta, s.X, mode="stored",
                                                             n_threads=t))

    def kfac():  # type-2 (the GGN's), expand: curvlinops' KFACLinearOperator as compared
        return ghess.KFACLinearOperator(model, loss, theta, data, n_threads=t)

    KF = functools.cache(kfac)
    KF_inverse = functools.cache(lambda: KF().inverse(KFAC_DAMPING))
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
        "ghess GGN product (stored)": Op("GGN product", lambda: G() @ v),
        "ghess GGN product (recompute)": Op("GGN product", lambda: Gr() @ v),
        "ghess GGN matmat x16 (stored)": Op("GGN matmat x16", lambda: G().matmat(V.T)),
        "ghess Hessian build (stored)": Op(
            "Hessian build", lambda: operator(ghess.HessianLinearOperator, "stored")),
        "ghess Hessian product (stored)": Op("Hessian product", lambda: H() @ v),
        "ghess Hessian product (recompute)": Op("Hessian product", lambda: Hr() @ v),
        "ghess EF product (stored)": Op("EF product", lambda: EF() @ v),
        "ghess KFAC build": Op("KFAC build", kfac, lambda K: K @ v),
        "ghess KFAC product": Op("KFAC product", lambda: KF() @ v),
        "ghess KFAC inverse product": Op("KFAC inverse product", lambda: KF_inverse() @ v),
        "ghess Jacobian product (stored)": Op("Jacobian product", lambda: J() @ v),
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
            if not s.wants(op):
                continue
            single = cls(model, loss, theta, data, mode="stored", n_threads=1)
            ops[f"ghess {op} (stored, 1 thread)"] = Op(op, lambda single=single: single @ v)
    ops = {name: entry for name, entry in ops.items() if s.wants(entry.op)}
    counted = ghess_gemm_flops(model, s.X.shape[0])
    for name, entry in ops.items():
        key = name[len("ghess "):].replace(", 1 thread", "")
        if key in counted:
            ops[name] = entry._replace(flops=counted[key], flops_source="ghess (layers)")
    return ops
