"""PyTorch: torch.func transforms on the flat theta, and the ordinary ``loss.backward()``.

torch.func gives the GGN product (jvp, the closed-form softmax B, vjp), the Hessian
product (jvp of grad), the Jacobian product and per-sample Jacobians
(``vmap(jacrev)``); "torch" names PyTorch's forward and ``loss.backward()`` on the
module. Flops are counted by ``FlopCounterMode``.
"""

from .common import Op, Unavailable, blocks_to_jacobians, loss_grad_to_numpy


def import_torch():
    """Return the torch module; :class:`Unavailable` if it cannot be imported."""
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


def torch_twin(s, torch):
    """Return the ``nn.Sequential`` twin of the model, its parameters set to theta."""
    from ghess import testing

    tdtype = {"float64": torch.float64, "float32": torch.float32}[s.theta.dtype.name]
    net = testing.torch_sequential(s.model, tdtype, params=s.theta)
    names = [name for name, _ in net.named_parameters()]
    if names != list(s.model.param_slots):  # theta's order is parameters()' order
        raise AssertionError(f"torch parameter order {names} differs from ghess's")
    return net


def competitor(s):
    """Return torch.func transforms on the flat theta, and PyTorch's ordinary backward."""
    import numpy as np

    torch = import_torch()
    torch.set_num_threads(s.threads)
    net = torch_twin(s, torch)
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

    def ef():
        # the empirical Fisher as the GGN of curvlinops' pseudo-loss: B_n = g_n g_n^T with
        # g_n = softmax - one-hot (the loss is summed: c = 1)
        z, Jv = func.jvp(f, (ttheta,), (tv,))
        g = torch.softmax(z, dim=1) - torch.nn.functional.one_hot(ty, z.shape[1]).to(z.dtype)
        u = g * (g * Jv).sum(dim=1, keepdim=True)
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
    ops = {
        "torch forward": Op("forward", forward),
        "torch loss+grad": Op("loss+grad", loss_grad, loss_grad_to_numpy),
        "torch.func GGN product": Op("GGN product", ggn),
        "torch.func Hessian product": Op("Hessian product", hvp),
        "torch.func EF product": Op("EF product", ef),
        "torch.func Jacobian product": Op("Jacobian product",
                                          lambda: func.jvp(f, (ttheta,), (tv,))[1]),
        # a dict of (n, K, *shape) blocks; concatenated only for the agreement check
        "torch.func per-sample Jacobians": Op(
            "per-sample Jacobians", lambda: jacobians(params, tXj),
            lambda out: blocks_to_jacobians([out[n] for n in names], n_jac, K)),
    }
    return with_torch_flops(torch, {name: entry for name, entry in ops.items()
                                    if s.wants(entry.op)})
