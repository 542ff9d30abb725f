"""``memory_required``: an operator's peak bytes, from dry runs on a few samples.

What an operator allocates at once is its held states (the stored factors or
traces, the private copies of data and parameters) plus the temporaries of the
chunk being built or multiplied. Counting those temporaries by hand for every
layer, pass and thread count is the error-prone part (the formula this module
replaced was 3-6x too high for some passes and 0 for others), so they are
measured instead: the operator is built and applied, under the same chunking
and threads, on two small synthetic data sets, with ``ghess._kernels.alloc``
counting every array ghess allocates at its exact size (the pool bypassed). Each
of the three figures is linear in the samples of a chunk (every temporary is
per sample, per thread or fixed), so two probes give a line, and the lines give
the peak for the real data's sample count and largest chunk.

The probes cost two builds and products on at most ``2 * max(PROBE_SAMPLES, 4 *
threads)`` samples (and never more than a chunk): tens of milliseconds, and a
fraction of what the operator itself needs.
"""

import math
from typing import NamedTuple

import numpy as np

from .._config import computing
from .._kernels import alloc

__all__ = ["PROBE_SAMPLES", "PROBE_SAMPLES_PER_THREAD", "MARGIN", "Probe", "measure",
           "largest_chunk", "probe_sizes", "peak_bytes", "example_batch"]

#: samples of the smaller probe, at least, and per thread: below ~8 samples some
#: temporaries grow slower than linearly (a conv net's Hessian product: 1.47 MB per
#: sample from 4 to 8 samples, 1.58 from 8 to 16, 1.59 beyond), so the probes start there
PROBE_SAMPLES = 8
PROBE_SAMPLES_PER_THREAD = 4
#: headroom over the extrapolated figure: for what the lines miss past the probes
#: (under 1% on the benchmark networks) and for the pool's reuse of blocks up to 1/16
#: larger than asked (the probes bypass the pool; a reused block's extra bytes count)
MARGIN = 1.08


class Probe(NamedTuple):
    """Bytes of one dry run: ``held`` after the build, and above it while building
    (``build``) and while multiplying (``product``).
    """  # noqa: D205, D415

    held: int
    build: int
    product: int


def measure(build, apply):
    """Build an operator (``build()``) and run ``apply(op)``; return their :class:`Probe`.

    Every array made inside counts, the operator's private copies included;
    the pool is bypassed so each counts at exactly its size.
    """
    bypassed = alloc.bypass_pool(True)
    try:
        with computing():
            base, _ = alloc.usage()
            op = build()
            held, build_peak = alloc.usage()
            apply(op)
            _, product_peak = alloc.usage()
            del op
    finally:
        alloc.bypass_pool(bypassed)
    return Probe(held - base, build_peak - held, product_peak - held)


def largest_chunk(batch_sizes, chunk_size):
    """Return the samples of the largest chunk ``batch_sizes`` are cut into (``_data``)."""
    return max(-(-n // -(-n // chunk_size)) for n in batch_sizes)


def probe_sizes(chunk, threads):
    """Return the two probes' sample counts: the chunk and half of it, when it is small."""
    upper = max(2, min(chunk, 2 * max(PROBE_SAMPLES, PROBE_SAMPLES_PER_THREAD * threads)))
    return upper // 2, upper


def peak_bytes(probe_at, n_samples, chunk, threads, output_bytes_per_sample=0, workers=1):
    """Peak bytes for ``n_samples`` cut into chunks of at most ``chunk`` samples.

    ``probe_at(c)`` returns the :class:`Probe` of an operator on ``c`` samples in
    one chunk. ``output_bytes_per_sample``: bytes per sample of the products'
    results and vectors that grow with the data set, not the chunk (the
    Jacobian's ``J v`` and ``J^T w``): counted per sample of the data.
    ``workers``: chunks built or multiplied at once, each with its temporaries.
    """
    small, large = probe_sizes(chunk, threads)
    a, b = probe_at(small), probe_at(large)

    def at(field, samples, per_sample=0):
        lo = getattr(a, field) - per_sample * small
        hi = getattr(b, field) - per_sample * large
        slope = (hi - lo) / (large - small)
        return max(hi + slope * (samples - large), 0.0)

    held = at("held", n_samples)
    build = workers * at("build", chunk)
    product = (workers * at("product", chunk, output_bytes_per_sample)
               + output_bytes_per_sample * n_samples)
    return math.ceil(MARGIN * (held + max(build, product)))


def example_batch(model, loss, n_samples, dtype, seed=0):
    """Synthetic inputs (and targets, with a loss) for a dry run."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples,) + tuple(model.input_shape)).astype(dtype)
    if loss is None:
        return X
    return X, loss.example_targets(n_samples, model.n_outputs, dtype)
