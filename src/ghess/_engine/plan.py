"""Planning: what the engine derives from a model's structure alone.

Everything here depends only on the model and the dtype's item size, never on
parameters or data, so it is computed once and cached (:func:`plan_for`):
which layers own parameters, where each stored Jacobian factor is taken
(``factor_plan``), the steps of factor paths and of Hessian products (with
fused activation + max-pooling steps), the bytes per sample each mode keeps,
and the chunk-size rule.
"""

import math
import weakref

from .._config import MAX_CHUNK_THREADS
from .._parallel import WORKER_CHUNKS
from .fused import ActivationMaxPool

__all__ = ["Plan", "plan_for", "chunk_size_for", "chunk_count", "CHUNK_BYTES", "MAX_CHUNK",
           "MAX_CHUNK_THREADS"]

#: temporaries of one chunk, in bytes; a network whose layers all batch samples into
#: their GEMMs (no ``wants_cache_sized_chunks`` layer) gets twice as many
CHUNK_BYTES = 64 << 20
#: the most samples in one chunk by default
MAX_CHUNK = 2048


def chunk_size_for(bytes_per_sample, budget, minimum=1, maximum=MAX_CHUNK):
    """Apply the chunk-size rule: as many samples as ``budget`` bytes hold, in [minimum, maximum].

    ``maximum`` None sets no upper bound.
    """
    size = max(budget // max(bytes_per_sample, 1), minimum)
    return size if maximum is None else min(size, maximum)


def chunk_count(batch_sizes, chunk_size):
    """Return the chunks ``_data.Batches.chunks`` cuts batches of ``batch_sizes`` into."""
    return sum(-(-n // chunk_size) for n in batch_sizes)


def chunk_for_workers(chunk, batch_sizes, workers, minimum):
    """The largest chunk size up to ``chunk`` that cuts the batches into a multiple of
    ``workers`` chunks (``_data.Batches.chunks``), down to half of ``chunk`` (and not
    below ``minimum``); failing that, the one giving the next multiple of chunks up."""  # noqa: D205, D209, D401
    n = sum(batch_sizes)
    count = chunk_count(batch_sizes, chunk)
    target = workers * -(-count // workers)
    first = None
    while True:
        size = min(chunk, max(minimum, -(-n // target)))
        if first is None:
            first = size
        if chunk_count(batch_sizes, size) % workers == 0:
            return size
        if size <= max(minimum, chunk // 2):
            return first
        target += workers


def param_layer_indices(model):
    """Return the indices of the layers that own parameters."""
    return [i for i, slots in enumerate(model.layer_slots) if slots]


def _shared_end(model, nxt):
    """Whether D at the input of layer ``nxt`` is one matrix for every sample.

    True when ``nxt`` is the last parametrised layer, its input Jacobian is
    sample-independent (a dense layer: its weight) and only identity layers
    follow it: then D there is that weight, and a factor ending there keeps no
    per-sample D at all.
    """
    return (nxt < len(model.layers) and model.layers[nxt].has_shared_input_jacobian
            and all(layer.is_identity for layer in model.layers[nxt + 1:]))


def path_steps(model, path, second_order=False):
    """Return the steps along ``path`` (layer indices), as ``(step, layer indices)`` pairs.

    A step is a layer, or an activation and the max-pooling after it fused
    into one (:class:`ActivationMaxPool`); ``second_order`` fuses only pairs
    whose Hessian R-backward is linear too (f'' = 0).
    """
    steps = []
    j = 0
    while j < len(path):
        layer = model.layers[path[j]]
        if j + 1 < len(path) and ActivationMaxPool.fuses(layer, model.layers[path[j + 1]],
                                                         second_order):
            steps.append((ActivationMaxPool(layer, model.layers[path[j + 1]]),
                          (path[j], path[j + 1])))
            j += 2
        else:
            steps.append((layer, (path[j],)))
            j += 1
    return tuple(steps)


def _input_is_data(model, i):
    """Whether layer i's input is the network input itself (no array of its own)."""
    return all(layer.is_identity for layer in model.layers[:i])


class FactorPlace:
    """Where a parametrised layer's stored factor D is taken.

    ``path``: the steps (``path_steps``) of the parameter-free layers after the
    layer that D is pushed through (empty: D at the layer's output), and
    ``layers`` their indices;
    ``end``: the index of the layer whose input D is taken at; ``bytes``: what
    D and the path's contexts keep per sample; ``shared``: whether D there is
    the next layer's sample-independent input Jacobian (``_shared_end``).
    """

    __slots__ = ("path", "layers", "end", "bytes", "shared")

    def __init__(self, path, end, nbytes, shared):
        self.path = path
        self.layers = tuple(i for _, indices in path for i in indices)
        self.end = end
        self.bytes = nbytes
        self.shared = shared


def factor_plan(model, itemsize, paths=True):
    """Where each parametrised layer's factor D is taken: ``{layer index: FactorPlace}``.

    D goes to the end of the parameter-free layers after the layer when that
    keeps fewer bytes; ``paths=False`` keeps every D at its layer's output,
    per sample (for dense per-sample Jacobians, which need D there).
    """
    K = model.n_outputs
    n_layers = len(model.layers)
    param_layers = param_layer_indices(model)
    plan = {}
    for i, nxt in zip(param_layers, param_layers[1:] + [n_layers]):
        after = model.layers[i + 1:]
        at_output_bytes = (0 if all(layer.is_identity for layer in after)
                           else K * math.prod(model.shapes[i + 1]) * itemsize)
        path = path_steps(model, tuple(range(i + 1, nxt)))
        shared = paths and _shared_end(model, nxt)
        end_bytes = (0 if nxt == n_layers or shared
                     else K * math.prod(model.shapes[nxt]) * itemsize)  # D at its end
        kept = end_bytes + sum(step.factor_bytes(model.shapes[indices[0]], itemsize, False)
                               for step, indices in path)
        if paths and (path or shared) and kept < at_output_bytes:
            plan[i] = FactorPlace(path, nxt, kept, shared)
        else:
            plan[i] = FactorPlace((), i + 1, at_output_bytes, False)
    return plan


class Plan:
    """The cached plan of one model for one dtype (see :func:`plan_for`).

    Attributes
    ----------
    param_layers : tuple of int
        Indices of the layers that own parameters; ``first`` the lowest.
    factors, dense_factors : dict
        ``factor_plan`` with and without factor paths.
    hessian_steps : tuple
        The steps of a Hessian product, ``(step, layer indices)``: the layers,
        with an activation whose f'' is zero fused with the max-pooling after it.
    stored_factor_bytes, trace_bytes : int
        Bytes per sample of the stored-factor path (GGN and Jacobian) and of a
        Hessian product's stored traces.
    chunk_budget : int
        Bytes of temporaries per chunk (``CHUNK_BYTES``, doubled for networks
        without ``wants_cache_sized_chunks`` layers), per thread where
        ``cache_sized``.
    cache_sized : bool
        Whether a layer wants chunks whose temporaries stay in cache.
    """

    def __init__(self, model, itemsize):
        self.itemsize = itemsize
        self.param_layers = tuple(param_layer_indices(model))
        self.first = self.param_layers[0] if self.param_layers else len(model.layers)
        self.factors = factor_plan(model, itemsize)
        self.dense_factors = factor_plan(model, itemsize, paths=False)
        self.hessian_steps = path_steps(model, tuple(range(len(model.layers))),
                                        second_order=True)
        self.input_is_data = tuple(_input_is_data(model, i) for i in range(len(model.layers)))
        self.stored_factor_bytes = self._stored_factor_bytes(model)
        self.trace_bytes = self._trace_bytes(model)
        self.cache_sized = any(layer.wants_cache_sized_chunks for layer in model.layers)
        self.chunk_budget = CHUNK_BYTES * (1 if self.cache_sized else 2)
        self._widths = sum(math.prod(s) for s in model.shapes)
        self._work = sum(layer.work_elements(model.shapes[i])
                         for i, layer in enumerate(model.layers))
        self._n_outputs = model.n_outputs

    @property
    def loss_state_bytes(self):
        """Bytes per sample of the loss state (softmax or sigma') kept for B."""
        return self._n_outputs * self.itemsize

    def _stored_factor_bytes(self, model):
        total = model.n_outputs * self.itemsize  # loss state (softmax or sigma') per sample
        for i, place in self.factors.items():
            total += place.bytes + model.layers[i].factor_bytes(
                model.shapes[i], self.itemsize, self.input_is_data[i])
        return total

    def _trace_bytes(self, model):
        """Exact for CrossEntropyLoss and BCEWithLogitsLoss; MSELoss keeps no loss
        state, so the figure is K numbers per sample above what it holds.
        """  # noqa: D205
        total = model.n_outputs * self.itemsize  # loss state (softmax or sigma')
        for step, indices in self.hessian_steps:
            i, last = indices[0], indices[-1]
            if step.is_identity:
                continue
            total += step.kept_bytes(model.shapes[i], self.itemsize, self.input_is_data[i])
            if step.uses_output_grad and i >= self.first:
                total += math.prod(model.shapes[last + 1]) * self.itemsize  # dL/d(output)
        return total

    def working_bytes(self, k):
        """Bytes per sample of the temporaries of one pass over a chunk, k directions."""
        return (4 * self._widths + 3 * k * self._widths + 4 * k * self._n_outputs
                + (1 + k) * self._work) * self.itemsize

    def chunk_size(self, k=1, minimum=16, threads=1, batch_sizes=()):
        """Default samples per chunk for passes with ``k`` directions on ``threads`` threads.

        Dense layers want many samples per chunk (the chunk is a GEMM
        dimension); convolutions run per-sample GEMMs and want chunks whose
        temporaries stay in cache (``chunk_budget``; measurements in
        ``docs/design.md``, "Measurements").

        On several threads, data of ``batch_sizes`` samples that fill at least
        ``WORKER_CHUNKS`` 1-thread chunks per thread is cut into a multiple of
        ``threads`` chunks of at most the 1-thread size, so that as many
        workers (``_parallel``) get equal shares, each chunk on one thread. With
        fewer samples the chunks
        run one at a time on all the threads, and a network of convolutions
        gets ``threads`` times the budget and the minimum (up to
        ``MAX_CHUNK_THREADS``): its kernels split a chunk's samples over the
        threads, each keeping a cache-sized share, and the costs of a chunk
        that do not shrink with threads keep their share of the work.
        """
        chunk = chunk_size_for(self.working_bytes(k), self.chunk_budget, minimum)
        if threads <= 1:
            return chunk
        if sum(batch_sizes) >= WORKER_CHUNKS * threads * chunk:
            return chunk_for_workers(chunk, batch_sizes, threads, minimum)
        scale = min(threads, MAX_CHUNK_THREADS) if self.cache_sized else 1
        return chunk_size_for(self.working_bytes(k), self.chunk_budget * scale,
                              minimum * scale)


_plans = weakref.WeakKeyDictionary()


def plan_for(model, itemsize):
    """Return the cached :class:`Plan` of ``model`` for a dtype of ``itemsize`` bytes."""
    per_model = _plans.get(model)
    if per_model is None:
        per_model = _plans[model] = {}
    plan = per_model.get(itemsize)
    if plan is None:
        plan = per_model[itemsize] = Plan(model, itemsize)
    return plan
