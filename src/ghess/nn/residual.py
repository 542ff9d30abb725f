"""Residual blocks: ``y = body(x) + shortcut(x)``.

A :class:`Residual` is one layer of its :class:`~ghess.Sequential` holding two chains
of layers, the body and the shortcut (empty: the identity). Every rule of the layer
contract is the sum of the two chains' rules, each chain run with its layers' own
rules in order:

- forward: ``y = b(x) + s(x)``; R-forward: ``R{y} = R{b} + R{s}``;
- backward: ``dL/dx = b'(x)^T g + s'(x)^T g``, both chains receiving the same ``g``;
- R-backward: each chain receives ``g`` and ``R{g}``, and its layers add their own
  second-order terms, so the block's R-term is the sum of the branches'.

For the stored-factor path the block is one parametrised layer: its factor D is taken
at its output (or after the parameter-free layers that follow it), and its parameter
products push tangents and cotangents through the chains with their layers' first-order
contexts. Its parameters are the body's, then the shortcut's, in order, named
``body.<j>.<name>`` and ``shortcut.<j>.<name>`` as in the ``torch.nn.Module`` that
:func:`ghess.to_torch` builds for it (attributes ``body`` and ``shortcut``, each an
``nn.Sequential``).
"""

from __future__ import annotations

import copy
import math

from .base import Layer, ParametricLayer

__all__ = ["Residual"]

_BRANCHES = ("body", "shortcut")


class _Chain:
    """One branch's layers with the geometry of the block's input: shapes and parameter layout.

    ``shapes[j]`` is the input shape of layer j (``shapes[-1]`` the output);
    ``names[j]`` the (prefixed name, own name) pairs of layer j's parameters;
    ``spans[j]`` the (start, stop) of its parameters in the block's slice of theta.
    """

    def __init__(self, branch, layers, input_shape, offset):
        self.branch = branch
        self.layers = layers
        self.shapes = [tuple(input_shape)]
        for j, layer in enumerate(layers):
            try:
                self.shapes.append(tuple(layer.output_shape(self.shapes[-1])))
            except ValueError as exc:
                raise ValueError(f"Residual {branch} layer {j}: {exc}") from None
        self.names, self.spans, self.param_shapes = [], [], []
        for j, layer in enumerate(layers):
            own = layer.param_shapes(self.shapes[j])
            self.names.append([(f"{branch}.{j}.{name}", name) for name, _ in own])
            self.param_shapes.extend((f"{branch}.{j}.{name}", shape) for name, shape in own)
            size = sum(math.prod(shape) for _, shape in own)
            self.spans.append((offset, offset + size))
            offset += size
        self.stop = offset
        #: index of the lowest layer with parameters (len(layers) if none)
        self.lowest = next((j for j, names in enumerate(self.names) if names), len(layers))

    def params(self, params):
        """Per layer, its own ``{name: view}`` from the block's dict."""
        return [{own: params[full] for full, own in names} for names in self.names]

    def has_params(self, j):
        return bool(self.names[j])


class Residual(ParametricLayer):
    """A residual block: ``y = body(x) + shortcut(x)``.

    Parameters
    ----------
    *layers : Layer
        The body, applied in order (at least one layer; residuals may nest).
    shortcut : Layer or sequence of Layer, optional
        The shortcut's layers, e.g. ``[Conv2d(16, 32, 1, stride=2, bias=False),
        BatchNorm2d(32)]``; ``None`` or an empty list: the identity.

    The body's and the shortcut's outputs must have the same shape. The parameters
    are the body's, then the shortcut's, keyed ``"<i>.body.<j>.weight"``, ... in the
    model (``i`` the block's index), as ``ghess.to_torch`` names them.

    Examples
    --------
    >>> import ghess
    >>> block = ghess.Residual(ghess.Linear(4, 4), ghess.Tanh(), ghess.Linear(4, 4))
    >>> model = ghess.Sequential(block, ghess.ReLU(), ghess.Linear(4, 2), input_shape=(4,))
    >>> list(model.param_slots)[:2]
    ['0.body.0.weight', '0.body.0.bias']
    """

    uses_output_grad = True
    #: ``input_grad`` keeps, in ``ctx["grads"]``, the gradients at the inner layers'
    #: outputs that ``rvjp`` reads: the Hessian trace calls it for every such block
    keeps_inner_grads = True

    def __init__(self, *layers: Layer, shortcut=None) -> None:
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Residual needs at least one layer in its body")
        if shortcut is None:
            shortcut = ()
        elif isinstance(shortcut, Layer):
            shortcut = (shortcut,)
        elif isinstance(shortcut, (list, tuple)):
            shortcut = tuple(shortcut)
        else:
            raise TypeError(f"Residual: shortcut must be a layer, a list of layers or None, "
                            f"got {type(shortcut).__name__}")
        for branch, chain in (("body", layers), ("shortcut", shortcut)):
            for j, layer in enumerate(chain):
                if not isinstance(layer, Layer):
                    raise TypeError(f"Residual: {branch} layer {j} must be a ghess layer, "
                                    f"got {type(layer).__name__}")
        self.body = tuple(copy.copy(layer) for layer in layers)
        self.shortcut = tuple(copy.copy(layer) for layer in shortcut)
        self._chains = None
        self._input_shape = None

    def __copy__(self):
        # the inner layers record their geometry: a copy owns copies of them
        new = Residual(*self.body, shortcut=self.shortcut)
        if self._input_shape is not None:
            new.output_shape(self._input_shape)
        return new

    def __repr__(self):
        body = ", ".join(repr(layer) for layer in self.body)
        if not self.shortcut:
            return f"Residual({body})"
        return f"Residual({body}, shortcut=[{', '.join(map(repr, self.shortcut))}])"

    # -- planner properties, from the inner layers ------------------------------
    @property
    def has_curvature(self):
        """Whether an inner layer has a second-order term of its own."""
        return any(layer.has_curvature for layer in self.body + self.shortcut)

    @property
    def wants_cache_sized_chunks(self):
        """Whether an inner layer wants cache-sized chunks (a convolution)."""
        return any(layer.wants_cache_sized_chunks for layer in self.body + self.shortcut)

    # -- spec -------------------------------------------------------------------
    def _geometry(self, input_shape):
        input_shape = tuple(input_shape)
        if self._chains is None or self._input_shape != input_shape:
            body = _Chain("body", self.body, input_shape, 0)
            shortcut = _Chain("shortcut", self.shortcut, input_shape, body.stop)
            if body.shapes[-1] != shortcut.shapes[-1]:
                raise ValueError(
                    f"Residual: the body's output shape {body.shapes[-1]} differs from the "
                    f"shortcut's {shortcut.shapes[-1]} (input shape {input_shape}); give the "
                    "shortcut layers that map the input to the body's output shape")
            self._chains, self._input_shape = (body, shortcut), input_shape
        return self._chains

    def output_shape(self, input_shape):
        """Return the body's output shape (the shortcut's must be the same)."""
        return self._geometry(input_shape)[0].shapes[-1]

    def param_shapes(self, input_shape):
        """Return the inner layers' parameters, the body's first, with prefixed names."""
        body, shortcut = self._geometry(input_shape)
        return body.param_shapes + shortcut.param_shapes

    def init_params(self, input_shape, rng, dtype):
        """Return each inner layer's PyTorch-style initial values, in order."""
        values = {}
        for chain in self._geometry(input_shape):
            for j, layer in enumerate(chain.layers):
                own = layer.init_params(chain.shapes[j], rng, dtype)
                values.update({full: own[name] for full, name in chain.names[j]})
        return values

    def _split(self, params):
        return [chain.params(params) for chain in self._chains]

    # -- parameter layout of directions and accumulators ------------------------
    def split_tangent(self, V):
        """Cut this block's slice ``V`` (k, n_block_params) into its inner layers' pieces."""
        return [[layer.split_tangent(V[:, start:stop]) if chain.has_params(j) else None
                 for j, (layer, (start, stop)) in enumerate(zip(chain.layers, chain.spans))]
                for chain in self._chains]

    def new_accumulator(self, k, dtype, into=None):
        """Zeroed accumulators of the inner layers (views of ``into`` when given)."""
        return [[layer.new_accumulator(k, dtype, None if into is None else into[start:stop])
                 if chain.has_params(j) else None
                 for j, (layer, (start, stop)) in enumerate(zip(chain.layers, chain.spans))]
                for chain in self._chains]

    def accumulator_to_flat(self, acc, out):
        """Add the inner layers' accumulators to ``out`` (k, n_block_params)."""
        for chain, accs in zip(self._chains, acc):
            for layer, a, (start, stop) in zip(chain.layers, accs, chain.spans):
                if a is not None:
                    layer.accumulator_to_flat(a, out[:, start:stop])

    # -- propagation --------------------------------------------------------------
    def forward(self, params, x, ctx, need, n_threads):
        """Return body(x) + shortcut(x); keep each inner layer's context and the parameters."""
        outputs = []
        for chain, chain_params in zip(self._chains, self._split(params)):
            contexts, y = [], x
            for layer, p in zip(chain.layers, chain_params):
                c = {}
                y = layer.forward(p, y, c, need, n_threads)
                contexts.append(c)
            ctx[chain.branch] = contexts
            outputs.append(y)
        if need >= 1:
            ctx["params"] = params  # views of theta: the parameter products read them
        return outputs[0] + outputs[1]

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{y} = R{body} + R{shortcut}; ``rctx`` keeps every inner layer's R{input}."""
        tangents = tangent if tangent is not None else [[None] * len(c.layers)
                                                         for c in self._chains]
        results = []
        for chain, chain_params, chain_tangents in zip(self._chains, self._split(params),
                                                       tangents):
            inner = []
            r = rx
            for layer, p, t, c in zip(chain.layers, chain_params, chain_tangents,
                                      ctx[chain.branch]):
                scratch = None if rctx is None else {}
                if rctx is not None:
                    inner.append((r, scratch))
                r = layer.jvp(p, t, c, r, n_threads, scratch)
            if rctx is not None:
                rctx[chain.branch] = inner
            results.append(r)
        rb, rs = results
        if rb is None or rs is None:
            r = rs if rb is None else rb
            # the identity shortcut alone passes R{x} on: a copy, never the caller's array
            return None if r is None else (r.copy() if r is rx else r)
        return rb + rs

    def _chain_vjp(self, chain, chain_params, contexts, g, accs, need_input_grad, n_threads):
        """Back-propagate g through one chain; return dL/d(block input) or None."""
        bottom = 0 if need_input_grad else chain.lowest
        for j in range(len(chain.layers) - 1, bottom - 1, -1):
            g = chain.layers[j].vjp(chain_params[j], contexts[j], g,
                                    None if accs is None else accs[j],
                                    j > bottom or need_input_grad, n_threads)
        return g if need_input_grad else None

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """Accumulate the inner parameters' gradients; return dL/dx (or None)."""
        return self._backward(self._split(params), ctx, gy, acc, need_input_grad, n_threads)

    def _backward(self, split, ctx, gy, acc, need_input_grad, n_threads):
        grads = [self._chain_vjp(chain, p, ctx[chain.branch], gy,
                                 None if acc is None else a, need_input_grad, n_threads)
                 for chain, p, a in zip(self._chains, split, acc or (None, None))]
        return grads[0] + grads[1] if need_input_grad else None

    def param_vjp(self, ctx, gy, acc, n_threads):
        """dL/dw += (dy/dw)^T gy, back through the chains (forward or factor contexts)."""
        self._backward(self._split(ctx["params"]), ctx, gy, acc, False, n_threads)

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx for a direction-free gy; keep the inner layers' output gradients in ctx.

        ``ctx["grads"]``, per chain and layer, dL/d(output) where the layer's
        ``rvjp`` reads it (``uses_output_grad``), else None: what a Hessian
        product's R-backward through the block needs, computed once per trace.
        """
        ctx["grads"], gx = self._inner_grads(self._split(params), ctx, gy, n_threads)
        return gx

    def _inner_grads(self, split, ctx, gy, n_threads):
        kept, total = [], None
        for chain, chain_params in zip(self._chains, split):
            contexts = ctx[chain.branch]
            grads = [None] * len(chain.layers)
            g = gy
            for j in range(len(chain.layers) - 1, -1, -1):
                layer = chain.layers[j]
                if layer.uses_output_grad:
                    grads[j] = g
                g = layer.input_grad(chain_params[j], g, contexts[j], n_threads)
            kept.append(grads)
            total = g if total is None else total + g
        return kept, total

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
        """R-backward through both chains, each layer with its own second-order term."""
        split = self._split(params)
        grads = ctx.get("grads")
        if grads is None:  # a trace without them: one direction-free backward now
            grads, _ = self._inner_grads(split, ctx, g, n_threads)
        if rctx is None or "body" not in rctx:  # the R-forward's inner R{input}s
            rctx = {}
            self.jvp(params, tangent, ctx, rx, n_threads, rctx)
        tangents = tangent if tangent is not None else [[None] * len(c.layers)
                                                        for c in self._chains]
        results = []
        for chain, chain_params, chain_tangents, chain_grads, a in zip(
                self._chains, split, tangents, grads, acc or (None, None)):
            bottom = 0 if need_input_grad else chain.lowest
            rg = rgy
            contexts, inner = ctx[chain.branch], rctx[chain.branch]
            for j in range(len(chain.layers) - 1, bottom - 1, -1):
                layer = chain.layers[j]
                rin, scratch = inner[j]
                rg = layer.rvjp(chain_params[j], chain_tangents[j], contexts[j],
                                chain_grads[j] if layer.uses_output_grad else None, rin, rg,
                                None if a is None else a[j], j > bottom or need_input_grad,
                                n_threads, scratch)
            results.append(rg)
        return results[0] + results[1] if need_input_grad else None

    # -- the stored-factor path ---------------------------------------------------
    def factor_context(self, ctx, n_threads=1):
        """Return the inner layers' factor contexts (parameter-free ones: first-order ones)."""
        out = {"params": ctx["params"]}
        for chain in self._chains:
            out[chain.branch] = [layer.factor_context(c, n_threads) if chain.has_params(j)
                                 else c
                                 for j, (layer, c) in enumerate(zip(chain.layers,
                                                                    ctx[chain.branch]))]
        return out

    def sample_jacobian(self, ctx, D, offset, J_out, n_threads):
        """Write the inner layers' columns: D pulled back through each chain."""
        for chain, chain_params in zip(self._chains, self._split(ctx["params"])):
            contexts = ctx[chain.branch]
            Dj = D
            for j in range(len(chain.layers) - 1, chain.lowest - 1, -1):
                layer = chain.layers[j]
                if chain.has_params(j):
                    layer.sample_jacobian(contexts[j], Dj, offset + chain.spans[j][0], J_out,
                                          n_threads)
                if j > chain.lowest:
                    Dj = layer.vjp(chain_params[j], contexts[j], Dj, None, True, n_threads)

    # -- memory -------------------------------------------------------------------
    def _inner_bytes(self, input_shape, itemsize, input_is_data, count):
        """Sum ``count(layer, shape, itemsize, input_is_data)`` over the inner layers.

        The block's input is one array that both chains' first layers may keep:
        it is counted once (a layer that keeps its input counts it unless told it
        is the data, so the difference tells whether it keeps it).
        """
        total, input_counted = 0, input_is_data
        for chain in self._geometry(input_shape):
            for j, layer in enumerate(chain.layers):
                shape = chain.shapes[j]
                if j > 0:
                    total += count(layer, shape, itemsize, False)
                    continue
                total += count(layer, shape, itemsize, input_counted)
                if not input_counted:
                    input_counted = (count(layer, shape, itemsize, False)
                                     - count(layer, shape, itemsize, True)
                                     == math.prod(shape) * itemsize)
        return total

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample of the inner contexts (need=2) and of the kept inner gradients."""
        total = self._inner_bytes(input_shape, itemsize, input_is_data,
                                  lambda layer, *args: layer.kept_bytes(*args))
        for chain in self._chains:  # dL/d(output) of the inner layers that read it
            total += sum(math.prod(chain.shapes[j + 1]) * itemsize
                         for j, layer in enumerate(chain.layers[:-1]) if layer.uses_output_grad)
        return total

    def factor_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample of the inner factor (and first-order) contexts."""
        return self._inner_bytes(input_shape, itemsize, input_is_data,
                                 lambda layer, *args: layer.factor_bytes(*args))

    def work_elements(self, input_shape):
        """Scalars per sample of the inner layers' activations and temporaries."""
        return sum(math.prod(chain.shapes[j + 1]) + layer.work_elements(chain.shapes[j])
                   for chain in self._geometry(input_shape)
                   for j, layer in enumerate(chain.layers))

