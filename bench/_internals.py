"""Private hooks into ghess, concentrated here.

These functions reach into ghess's private modules (their names start with an
underscore), which carry no compatibility promise and are being renamed. Every
such use in ``bench/`` goes through this module, so that a rename is remapped in
one place. Nothing here is imported by ``bench/ab.py``, which must run unchanged on
any build of ghess: it uses the public API only.
"""


def factor_plan(model, itemsize):
    """``ghess._engine.factor_plan``: {layer: (path, bytes per sample, shared)} of each D."""
    from ghess import _engine

    return _engine.factor_plan(model, itemsize)


def path_bytes(model, path, itemsize):
    """``ghess._engine.path_bytes``: bytes per sample that a factor path's steps keep."""
    from ghess import _engine

    return _engine.path_bytes(model, path, itemsize)


def gemm_rowmajor(trans_a, trans_b, alpha, a, b, beta, c, n_threads):
    """``ghess._kernels.gemm_rowmajor``: ``c = alpha op(a) op(b) + beta c``, SciPy's BLAS."""
    from ghess import _kernels

    return _kernels.gemm_rowmajor(trans_a, trans_b, alpha, a, b, beta, c, n_threads)
