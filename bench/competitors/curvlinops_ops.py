"""curvlinops: its ``GGNLinearOperator`` and ``HessianLinearOperator`` times a torch vector."""

from .common import Op, Unavailable
from .pytorch import import_torch, torch_twin, with_torch_flops


def competitor(s):
    """Return curvlinops' GGN and Hessian products with a torch vector (its fastest path)."""
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
    ops = {"curvlinops GGN product": Op("GGN product", lambda: G @ tv),
           "curvlinops Hessian product": Op("Hessian product", lambda: H @ tv)}
    return with_torch_flops(torch, {name: entry for name, entry in ops.items()
                                    if s.wants(entry.op)})
