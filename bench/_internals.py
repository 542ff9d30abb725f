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


def single_threaded_blas():
    """``ghess._config.single_threaded_blas()``: BLAS held at one thread inside the block,
    as inside ghess's computations (ghess splits its GEMMs over OpenMP threads itself)."""  # noqa: D205, D209
    from ghess._config import single_threaded_blas as hold

    return hold()


def stage_hooks():
    """Return what ``bench/stages.py`` wraps with timers, by role.

    ``kernels``: (label, module) of the Cython kernel modules, whose functions the
    layers and the engine call through the module; ``steps``: the engine's own
    step classes (fused activation + max-pooling); ``finiteness``: the modules
    that call ``all_finite`` (the engine's passes; the checks of inputs, and of
    the operators' vectors); ``engine``: the package whose ``prepare_tangents``,
    ``new_accumulators`` and ``accumulators_to_flat`` the operators call.
    """
    from ghess import _engine, _validation
    from ghess._engine import fused, passes
    from ghess._kernels import conv, dense
    from ghess.operators import base

    return {"kernels": (("dense", dense), ("conv", conv)),
            "steps": (fused.ActivationMaxPool,),
            "finiteness": (passes, _validation, base),
            "engine": _engine}


def ghess_isa():
    """Return the ISA levels of ghess's kernels in use, by name (``GHESS_ISA``)."""
    from ghess._kernels import conv, dense

    return (f"direct convolutions {conv.isa_name()}, other C kernels "
            f"{conv.ISA_NAMES[dense.isa()]}")


def measured_isa_choices():
    """Return the direct convolutions' per-layer builds measured so far in this process, as
    ``"<kernel> <geometry> C=<channels> K=<K> <dtype>: <build>"`` strings
    (``ghess._kernels.conv.measured_isa_choices``)."""  # noqa: D205, D209
    from ghess._kernels import conv

    return [f"{kind} {geom} C={channels} K={K} {dtype}: {conv.ISA_NAMES[level]}"
            for (kind, geom, channels, K, dtype), level
            in sorted(conv.measured_isa_choices().items(), key=str)]


def rank_order_sum(comm, array):
    """Sum ``array`` over the MPI ranks as ghess does (``bench/mpi.py`` times it alone)."""
    from ghess._distributed import sum_in_rank_order

    return sum_in_rank_order(comm, array)
