"""The dense layer ``y = x W^T + b``."""

import numpy as np

from .._kernels import dense
from .base import WeightBiasLayer, check_bias, positive_int

__all__ = ["Linear"]


class Linear(WeightBiasLayer):
    """Dense layer ``y = x W^T + b``, as ``torch.nn.Linear``.

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths. ``weight`` has shape ``(out_features, in_features)``.
    bias : bool, default=True
        Whether the layer has a bias of shape ``(out_features,)``.
    """

    has_shared_input_jacobian = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        self.in_features = positive_int(in_features, "in_features", "Linear")
        self.out_features = positive_int(out_features, "out_features", "Linear")
        self.bias = check_bias(bias, "Linear")

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias})")

    def param_shapes(self, input_shape):
        """Return weight (out_features, in_features), then bias (out_features,)."""
        shapes = [("weight", (self.out_features, self.in_features))]
        if self.bias:
            shapes.append(("bias", (self.out_features,)))
        return shapes

    def output_shape(self, input_shape):
        """(out_features,), for a flat input of in_features."""
        if len(input_shape) != 1:
            raise ValueError(
                f"{self!r} expects a flat input of {self.in_features} features per sample, "
                f"got per-sample shape {tuple(input_shape)}: add a Flatten() before it")
        if input_shape[0] != self.in_features:
            raise ValueError(
                f"{self!r} expects {self.in_features} input features, "
                f"but the previous layer produces {input_shape[0]}")
        return (self.out_features,)

    def init_params(self, input_shape, rng, dtype):
        """PyTorch's default: U(-1/sqrt(in_features), 1/sqrt(in_features))."""
        # PyTorch: kaiming_uniform_(a=sqrt(5)) for the weight, i.e. U(-1/sqrt(fan_in), ...),
        # and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias.
        bound = 1.0 / np.sqrt(self.in_features)
        params = {"weight": rng.uniform(-bound, bound, (self.out_features, self.in_features))}
        if self.bias:
            params["bias"] = rng.uniform(-bound, bound, self.out_features)
        return {name: value.astype(dtype) for name, value in params.items()}

    # -- propagation ------------------------------------------------------
    def accumulator_shapes(self, k):
        """Stack the k directions' weights as rows, (k * out, in); biases (k * out,)."""
        return (k * self.out_features, self.in_features), (k * self.out_features,)

    def forward(self, params, x, ctx, need, n_threads):
        """Y = x W^T + b; keeps ``x`` for the parameter derivatives."""
        W = params["weight"]
        y = np.empty((x.shape[0], self.out_features), dtype=x.dtype)
        dense.gemm_rowmajor(False, True, 1.0, x, W, 0.0, y, n_threads)
        if self.bias:
            dense.add_grouped_rows(y[:, None, :], params["bias"][None, :], n_threads)
        ctx["x"] = x
        return y

    def factor_context(self, ctx, n_threads=1):
        """Return what the stored-Jacobian path keeps: the layer input."""
        return {"x": ctx["x"]}

    def input_jacobian(self, params):
        """dy/dx, the same (out, in) matrix for every sample: the weight."""
        return params["weight"]

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Count the input, unless it is the network input itself."""
        return 0 if input_is_data else self.in_features * itemsize

    factor_bytes = kept_bytes

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{y} = x V_W^T + R{x} W^T + v_b, for k directions."""
        x = ctx["x"]
        n = x.shape[0]
        Vw = tangent["weight"]
        k = Vw.shape[0] // self.out_features
        ry = np.empty((n, k, self.out_features), dtype=x.dtype)
        # (n, in) @ (in, k*out): all k directions in one GEMM
        dense.gemm_rowmajor(False, True, 1.0, x, Vw, 0.0, ry.reshape(n, -1), n_threads)
        if rx is not None:
            dense.gemm_rowmajor(False, True, 1.0, rx.reshape(n * k, -1), params["weight"],
                                1.0, ry.reshape(n * k, -1), n_threads)
        if self.bias:
            dense.add_grouped_rows(ry, tangent["bias"], n_threads)
        return ry

    has_kronecker_factors = True

    def kfac_weight_shape(self):
        """Return the shape of the weight as KFAC's matrix: (out_features, in_features)."""
        return self.out_features, self.in_features

    def kfac_inputs(self, ctx, approx, n_threads):
        """The inputs x (n, in_features), rows of ``X^T X``: no weight sharing, so the
        two approximations agree."""  # noqa: D205, D209, D401
        return ctx["x"][None], True

    def kfac_sample_operands(self, ctx, gy, n_threads):
        """Return the inputs (n, in, 1) and output gradients (n, m, out, 1)."""
        return ctx["x"][:, :, None], gy[..., None]

    def kfac_output_grads(self, gy, approx):
        """The output gradients, a row per sample and column: (1, n m, out_features)."""  # noqa: D401
        return gy.reshape(1, -1, self.out_features), True

    def param_vjp(self, ctx, gy, acc, n_threads):
        """dL/dW += gy^T x and dL/db += sum(gy), for k directions."""
        x = ctx["x"]
        n = x.shape[0]
        g2 = gy.reshape(n, -1)
        dense.gemm_rowmajor(True, False, 1.0, g2, x, 1.0, acc["weight"], n_threads)
        if self.bias:
            dense.sum_rows_into(g2, acc["bias"], n_threads)

    def input_vjp(self, params, gy, n_threads):
        """dL/dx = gy W."""
        n, k = gy.shape[0], gy.shape[1]
        gx = np.empty((n, k, self.in_features), dtype=gy.dtype)
        dense.gemm_rowmajor(False, False, 1.0, gy.reshape(n * k, -1), params["weight"],
                            0.0, gx.reshape(n * k, -1), n_threads)
        return gx

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
        """R-operator of ``vjp`` given g = dL/dy (n, out) and R{dL/dy} (n, k, out).

        R{dL/dW} = R{g}^T x + g^T R{x},  R{dL/db} = sum R{g},
        R{dL/dx} = R{g} W + g V_W.
        """
        x = ctx["x"]
        n, k = rgy.shape[0], rgy.shape[1]
        self.param_vjp(ctx, rgy, acc, n_threads)
        if rx is not None and k == 1:  # g^T R{x} straight into the accumulator
            dense.gemm_rowmajor(True, False, 1.0, g, rx.reshape(n, -1), 1.0, acc["weight"],
                                n_threads)
        elif rx is not None:
            # g^T R{x}: (out, n) @ (n, k*in), then reorder to (k, out, in)
            cross = np.empty((self.out_features, k * self.in_features), dtype=x.dtype)
            dense.gemm_rowmajor(True, False, 1.0, g, rx.reshape(n, -1), 0.0, cross, n_threads)
            acc["weight"].reshape(k, self.out_features, self.in_features)[...] += (
                cross.reshape(self.out_features, k, self.in_features).transpose(1, 0, 2))
        if not need_input_grad:
            return None
        rgx = np.empty((n, k, self.in_features), dtype=x.dtype)
        dense.gemm_rowmajor(False, False, 1.0, rgy.reshape(n * k, -1), params["weight"],
                            0.0, rgx.reshape(n * k, -1), n_threads)
        # g V_W for all k at once: V_W rearranged as (out, k*in)
        v_cat = tangent.get("weight_by_output")
        if v_cat is None:
            v_cat = np.ascontiguousarray(
                tangent["weight"].reshape(k, self.out_features, self.in_features)
                .transpose(1, 0, 2)).reshape(self.out_features, k * self.in_features)
            tangent["weight_by_output"] = v_cat
        dense.gemm_rowmajor(False, False, 1.0, g, v_cat, 1.0, rgx.reshape(n, -1), n_threads)
        return rgx

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx = gy W for direction-free gy (n, out)."""
        gx = np.empty((gy.shape[0], self.in_features), dtype=gy.dtype)
        dense.gemm_rowmajor(False, False, 1.0, gy, params["weight"], 0.0, gx, n_threads)
        return gx

    def sample_jacobian(self, ctx, D, offset, J_out, n_threads):
        """Write this layer's columns of the per-sample Jacobians ``J_out``."""
        dense.linear_sample_jacobian(D, ctx["x"], self.bias, offset, J_out, n_threads)
