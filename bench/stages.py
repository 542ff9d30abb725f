"""Per-stage wall times of ghess's operations, to find what does not scale with threads.

:func:`instrument` wraps, for the life of the process, every public function of
the Cython kernel modules, the layers' and losses' methods, the fused steps', the
forward pass of ``Sequential`` and the finiteness checks with timers. Each
stage's time is *exclusive*: a layer method's time excludes the kernels it calls,
so the layer's own share is its Python and NumPy work. What no stage covers (the
operator's loop over chunks, tangent preparation, argument checks) is reported as
``(outside stages: python, waiting)``.

Timed at 1 and at p threads, a stage's speed-up tells whether it runs in
parallel; the Karp-Flatt serial fraction of a whole operation,
``e = (1/S - 1/p) / (1 - 1/p)`` with S its speed-up, tells how much of it
behaves as if serial (``bench/scaling.py --stages`` reports both).

With workers (ghess's coarse parallelism: several Python threads each running chunks on
one core) every thread keeps its own stack of stages, and a stage's time is the sum
over the threads divided by the number of threads that ran stages: its share of the
wall time if the threads ran side by side. The wall time no stage covers then
includes the time threads waited for each other (the caller's serial work, uneven
runs), in ``(outside stages: python, waiting)``.

The wrappers cost about a microsecond a call; they change no result. This module
reaches into private modules (through ``bench/_internals.py``, which names them)
and is used only by the benchmark.
"""

import functools
import threading
import time
from collections import defaultdict

#: exclusive seconds and calls per stage name, since the last :func:`reset`, summed
#: over the threads
TOTALS = defaultdict(float)
CALLS = defaultdict(int)
#: the names of the threads that ran stages since the last :func:`reset` (the workers'
#: threads are new on every call, named by their worker number)
THREADS = set()
_lock = threading.Lock()  # TOTALS, CALLS and THREADS are updated from several threads
_local = threading.local()  # .stack: per active stage of this thread, its children's seconds
#: the stage name of the wall time no stage covers
OUTSIDE = "(outside stages: python, waiting)"

#: the methods of layers, steps and losses that run the computation
_METHODS = ("forward", "jvp", "vjp", "rvjp", "input_grad", "input_vjp", "param_vjp",
            "factor_context", "context", "input_jacobian", "split_tangent", "new_accumulator",
            "accumulator_to_flat", "value_grad", "hessian_apply", "hessian_kernel_args")


def reset():
    """Forget the times recorded so far."""
    with _lock:
        TOTALS.clear()
        CALLS.clear()
        THREADS.clear()


def _run_timed(name, fn, args, kwargs):
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(0.0)
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        elapsed = time.perf_counter() - t0
        children = stack.pop()
        with _lock:
            TOTALS[name] += elapsed - children
            CALLS[name] += 1
            THREADS.add(threading.current_thread().name)
        if stack:
            stack[-1] += elapsed


def _timed(name, fn):
    """``fn`` timed as stage ``name``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _run_timed(name, fn, args, kwargs)
    wrapper.__stage__ = name
    return wrapper


def _timed_method(cls, method):
    """``cls.method`` timed as stage ``"<class of the instance>.<method>"``."""
    original = cls.__dict__[method]

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        return _run_timed(f"{type(self).__name__}.{method}", original, (self,) + args, kwargs)
    wrapper.__stage__ = method
    return wrapper


def _subclasses(cls):
    seen, todo = [], [cls]
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.append(c)
            todo.extend(c.__subclasses__())
    return seen


def instrument():
    """Wrap the kernels, layer, step and loss methods and the checks with stage timers."""
    from ghess import nn

    from ._internals import stage_hooks

    hooks = stage_hooks()
    kernels = hooks["kernels"]
    if getattr(kernels[0][1].gemm_rowmajor, "__stage__", None):
        return  # already instrumented
    for label, module in kernels:
        for name in dir(module):
            fn = getattr(module, name)
            if name.startswith("_") or not callable(fn) or isinstance(fn, type):
                continue
            setattr(module, name, _timed(f"kernel {label}.{name}", fn))
    classes = _subclasses(nn.Layer) + _subclasses(nn.Loss) + list(hooks["steps"])
    for cls in classes:
        for method in _METHODS:
            attribute = cls.__dict__.get(method)
            if callable(attribute) and not isinstance(attribute, staticmethod):
                setattr(cls, method, _timed_method(cls, method))
    nn.Sequential.forward_chunk = _timed("Sequential.forward_chunk (python)",
                                         nn.Sequential.forward_chunk)
    for module in hooks["finiteness"]:
        module.all_finite = _timed("all_finite (finiteness check)", module.all_finite)
    engine = hooks["engine"]
    for name in ("prepare_tangents", "new_accumulators", "accumulators_to_flat"):
        setattr(engine, name, _timed(f"engine {name}", getattr(engine, name)))


def profile(fn, repeats):
    """Run ``fn`` ``repeats`` times: (median seconds, {stage: seconds}, {stage: calls}).

    Seconds and calls are per run of ``fn``.
    """
    import numpy as np

    fn()  # warm-up, untimed
    reset()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    total = float(np.sum(times))
    threads = max(len(THREADS), 1)
    per_call = {name: t / (repeats * threads) for name, t in TOTALS.items()}
    per_call[OUTSIDE] = total / repeats - sum(per_call.values())
    calls = {name: count / repeats for name, count in CALLS.items()}
    return float(np.median(times)), per_call, calls
