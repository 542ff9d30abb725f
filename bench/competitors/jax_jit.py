"""JAX: the same operations as torch.func, each under ``jax.jit``, x64 enabled.

Flops are XLA's cost analysis of the compiled function.
"""

from .common import Op, Unavailable, blocks_to_jacobians, loss_grad_to_numpy


def jax_unflatten(model, flat):
    """Per layer, a dict of parameter arrays cut from the flat theta (as ghess does)."""
    params = [{} for _ in model.layers]
    for slot in model.param_slots.values():
        params[slot.layer_index][slot.attr] = flat[slot.start:slot.stop].reshape(slot.shape)
    return params


def jax_forward(model, params_list, x):
    """Apply ``model`` to the batch ``x`` (NCHW for conv nets) in JAX."""
    return _chain(model.layers, params_list, x)


def _chain(layers, params_list, x):
    """Apply ``layers`` in order, each with its dict of parameters."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import ghess as G

    for layer, params in zip(layers, params_list):
        if isinstance(layer, G.Residual):
            branches = []
            for name, inner in (("body", layer.body), ("shortcut", layer.shortcut)):
                inner_params = [{key.split(".", 2)[2]: value for key, value in params.items()
                                 if key.startswith(f"{name}.{j}.")}
                                for j in range(len(inner))]
                branches.append(_chain(inner, inner_params, x))
            x = branches[0] + branches[1]
        elif isinstance(layer, (G.BatchNorm1d, G.BatchNorm2d)):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            inv_sigma = 1 / jnp.sqrt(jnp.asarray(layer.running_var, x.dtype) + layer.eps)
            gamma = params["weight"] if layer.affine else jnp.ones_like(inv_sigma)
            beta = params["bias"] if layer.affine else jnp.zeros_like(inv_sigma)
            x = ((x - jnp.asarray(layer.running_mean, x.dtype).reshape(shape))
                 * (gamma * inv_sigma).reshape(shape) + beta.reshape(shape))
        elif isinstance(layer, G.Linear):
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
        elif isinstance(layer, G.GELU):
            x = jax.nn.gelu(x, approximate=layer.approximate == "tanh")
        elif isinstance(layer, G.SiLU):
            x = jax.nn.silu(x)
        elif isinstance(layer, G.ELU):
            x = jax.nn.elu(x, layer.alpha)
        elif isinstance(layer, G.Identity):
            pass
        else:
            raise NotImplementedError(f"jax_forward: no JAX equivalent for {layer!r}")
    return x


def competitor(s):
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

    def ef(flat, vec, X, y):
        z, Jv = jax.jvp(lambda t: f(t, X), (flat,), (vec,))
        g = jax.nn.softmax(z, axis=1) - jax.nn.one_hot(y, z.shape[1], dtype=z.dtype)
        u = g * jnp.sum(g * Jv, axis=1, keepdims=True)  # B_n = g_n g_n^T (c = 1)
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
        # XLA:CPU runs vmap(jacrev) of these conv nets in time quadratic in the batch; a
        # loop over samples is linear (the note, shown in the report, gives the figures)
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
    # name: (operation, its compiled call), each compiled only if asked for (``s.ops``)
    entries = {
        "JAX forward": ("forward", lambda: op("forward", timed(f, theta, X), theta, X)),
        "JAX loss+grad": ("loss+grad", lambda: op(
            "loss+grad", timed(jax.value_and_grad(objective), theta, X, y), theta, X, y,
            to_numpy=loss_grad_to_numpy)),
        "JAX GGN product": ("GGN product", lambda: op(
            "GGN product", timed(ggn, theta, v, X), theta, v, X)),
        "JAX EF product": ("EF product", lambda: op(
            "EF product", timed(ef, theta, v, X, y), theta, v, X, y)),
        "JAX Hessian product": ("Hessian product", lambda: op(
            "Hessian product", timed(hvp, theta, v, X, y), theta, v, X, y)),
        "JAX Jacobian product": ("Jacobian product", lambda: op(
            "Jacobian product", timed(jvp, theta, v, X), theta, v, X)),
        # per layer, a dict of (n, K, *shape) blocks; concatenated only for the check
        "JAX per-sample Jacobians": ("per-sample Jacobians", lambda: op(
            "per-sample Jacobians", timed(jacobians, params, Xj), params, Xj,
            to_numpy=lambda out: blocks_to_jacobians(
                [out[sl.layer_index][sl.attr] for sl in slots], n_jac, K),
            note=jacobian_note)),
    }
    return {name: build() for name, (kind, build) in entries.items() if s.wants(kind)}
