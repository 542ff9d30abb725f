"""curvlinops: its GGN, Hessian and KFAC operators (and KFAC's inverse) times a torch vector."""

import functools

from .common import KFAC_DAMPING, Op, Unavailable, to_numpy
from .pytorch import import_torch, torch_twin, with_torch_flops


def competitor(s):
    """Return curvlinops' operations with a torch vector (its fastest path)."""
    torch = import_torch()
    try:
        import curvlinops
    except ImportError as exc:
        raise Unavailable(f"curvlinops is not importable ({exc})") from None
    torch.set_num_threads(s.threads)
    net = torch_twin(s, torch)
    # parameters() is theta's order, and curvlinops flattens each one in C order
    args = (net, torch.nn.CrossEntropyLoss(reduction="sum"), list(net.parameters()),
            [(torch.from_numpy(s.X), torch.from_numpy(s.y))])
    kwargs = {"check_deterministic": False, "num_data": s.X.shape[0]}
    G = curvlinops.GGNLinearOperator(*args, **kwargs)
    H = curvlinops.HessianLinearOperator(*args, **kwargs)
    tv = torch.from_numpy(s.v.copy())

    def kfac():  # type-2, expand (as ghess's): the factors computed now, not on first use
        K = curvlinops.KFACLinearOperator(*args, fisher_type="type-2", **kwargs)
        K.compute_kronecker_factors()
        return K

    KF = functools.cache(kfac)
    KF_inverse = functools.cache(lambda: curvlinops.KFACInverseLinearOperator(
        KF(), damping=KFAC_DAMPING, use_exact_damping=True))
    ops = {"curvlinops GGN product": Op("GGN product", lambda: G @ tv),
           "curvlinops Hessian product": Op("Hessian product", lambda: H @ tv),
           "curvlinops KFAC build": Op("KFAC build", kfac, lambda K: to_numpy(K @ tv)),
           "curvlinops KFAC product": Op("KFAC product", lambda: KF() @ tv),
           "curvlinops KFAC inverse product": Op("KFAC inverse product",
                                                 lambda: KF_inverse() @ tv)}
    return with_torch_flops(torch, {name: entry for name, entry in ops.items()
                                    if s.wants(entry.op)})
