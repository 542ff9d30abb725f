"""Private hooks into ghess, concentrated here.

These functions reach into ghess's private modules (their names start with an
underscore), which carry no compatibility promise and are being renamed. Every
such use in ``bench/`` goes through this module, so that a rename is remapped in
one place. Nothing here is imported by ``bench/ab.py``, which must run unchanged on
any build of ghess: it uses the public API only.
"""


def factor_plan(model, itemsize):
    """Where each layer's stored factor D is taken: {layer: (path, bytes per sample, shared)}.

    From ``ghess._engine.plan.plan_for(model, itemsize).factors``.
    """
    from ghess._engine.plan import plan_for

    return {i: (place.layers, place.bytes, place.shared)
            for i, place in plan_for(model, itemsize).factors.items()}


def path_bytes(model, path, itemsize):
    """Bytes per sample that the steps of a factor path (layer indices) keep."""
    from ghess._engine.plan import path_steps

    return sum(step.factor_bytes(model.shapes[indices[0]], itemsize, False)
               for step, indices in path_steps(model, tuple(path)))


def gemm_rowmajor(trans_a, trans_b, alpha, a, b, beta, c, n_threads):
    """``ghess._kernels.dense.gemm_rowmajor``: ``c = alpha op(a) op(b) + beta c``, SciPy's BLAS."""
    from ghess._kernels import dense

    return dense.gemm_rowmajor(trans_a, trans_b, alpha, a, b, beta, c, n_threads)
