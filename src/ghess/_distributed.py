"""Data-parallel computations over MPI: each rank holds a shard, results are the whole data's.

ghess takes any ``mpi4py`` communicator (``comm=``); mpi4py itself is optional and
never imported here. Every reduction is :func:`sum_in_rank_order`: each rank
adds one slice of the ranks' arrays in rank order and the slices are gathered
on every rank, so every rank gets the same bits whatever the MPI library's
reduction tree, and SciPy's solvers take the same iterates on every rank (an
SPMD program stays in step).

Before any work, :func:`check_agreement` compares across ranks what must agree
(the model's structure, the parameters' length, dtype and a checksum): a
mismatch raises the same ``ValueError`` on every rank instead of a hang or a
silently wrong sum. An exception on ONE rank (a bad shard, say) cannot be
seen by the others, which would wait in the next collective: run MPI programs
as ``mpiexec -n 4 python -m mpi4py script.py``, which aborts every rank when one
raises.
"""

import zlib

import numpy as np

__all__ = ["check_comm", "sum_in_rank_order", "sum_all_in_rank_order", "rank_counts_or_raise",
           "global_count_or_raise", "first_sample", "check_agreement"]


def check_comm(comm):
    """Return ``comm`` (None, or an mpi4py communicator); TypeError otherwise."""
    if comm is None:
        return None
    if not all(hasattr(comm, name) for name in ("Get_rank", "Get_size", "Allgather",
                                               "Alltoallv", "Allgatherv", "Bcast",
                                               "allgather")):
        raise TypeError(f"comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD) or "
                        f"None, got {type(comm).__name__}")
    return comm


#: below this many bytes gathered in all, a sum is one allgather and the whole sum on
#: every rank: latency, not bandwidth, is what a scalar's reduction costs
SMALL_REDUCTION_BYTES = 64 << 10


def sum_in_rank_order(comm, array):
    """Return the sum over the ranks of ``array`` (same shape and dtype on every rank).

    A reduce-scatter then an allgather, both by hand: rank j receives every
    rank's j-th slice of the flattened array (``Alltoallv``), adds the slices in
    rank order, and the summed slices are gathered on every rank
    (``Allgatherv``). Each rank sends and receives ``2 (P - 1) / P`` times the
    array's bytes, as a ring allreduce does, but the order of the additions is
    fixed (rank 0's part, plus rank 1's, ...): bit-identical on every rank
    whatever the MPI library. A small array (``SMALL_REDUCTION_BYTES`` over all
    ranks) is allgathered whole and summed on every rank in the same order, in
    one collective. ``comm`` None returns ``array`` itself.
    """
    if comm is None or comm.Get_size() == 1:
        return array
    send = np.ascontiguousarray(array).reshape(-1)
    rank, size = comm.Get_rank(), comm.Get_size()
    if send.nbytes * size <= SMALL_REDUCTION_BYTES:  # one collective instead of two
        parts = np.empty((size, send.size), dtype=send.dtype)
        comm.Allgather(send, parts)
        return _rank_order_total(parts).reshape(np.shape(array))
    counts, displs = slice_bounds(send.size, size)
    mine = counts[rank]
    parts = np.empty((size, mine), dtype=send.dtype)
    comm.Alltoallv([send, (counts, displs)],
                   [parts, ([mine] * size, [i * mine for i in range(size)])])
    total = np.empty_like(send)
    comm.Allgatherv(_rank_order_total(parts), [total, (counts, displs)])
    return total.reshape(np.shape(array))


def _rank_order_total(parts):
    """``parts[0] + parts[1] + ...`` added in that order: both paths' bits are these."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def sum_all_in_rank_order(comm, arrays):
    """Return :func:`sum_in_rank_order` of each of ``arrays`` (one dtype), in one reduction.

    Packed into one vector and unpacked: one collective's latency instead of one
    per array (KFAC's factors: two per layer). ``comm`` None returns ``arrays``.
    """
    arrays = list(arrays)
    if comm is None or comm.Get_size() == 1 or not arrays:
        return arrays
    total = sum_in_rank_order(comm, np.concatenate([np.ravel(a) for a in arrays]))
    bounds = np.cumsum([0] + [np.size(a) for a in arrays])
    return [total[start:stop].reshape(np.shape(a))
            for a, start, stop in zip(arrays, bounds[:-1], bounds[1:])]


def slice_bounds(n, size):
    """Return the counts and offsets of ``size`` contiguous slices of ``n`` items, even."""
    counts = [n // size + (i < n % size) for i in range(size)]
    displs = [sum(counts[:i]) for i in range(size)]
    return counts, displs


def _as_message(failure):
    """Return a rank's validation error as ``(type name, message)`` to gather, or None."""
    return None if failure is None else (type(failure).__name__, str(failure))


def _raise_first_failure(messages, what):
    """Raise, on every rank, the first rank's gathered error (``_as_message``), if any."""
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, (kind, message) = failed[0]
        more = f" (and {len(failed) - 1} more rank(s) failed)" if len(failed) > 1 else ""
        raise (TypeError if kind == "TypeError" else ValueError)(
            f"rank {rank}'s {what}: {message}{more}")


def rank_counts_or_raise(comm, count, failure=None):
    """Return every rank's sample count, in rank order; raise on every rank if one failed.

    ``failure`` is this rank's validation error (or None): every rank learns of
    every other's, so a bad shard on one rank ends the call on all of them with
    the same message instead of leaving the others waiting in a collective.
    Without ``comm``: ``[count]``.
    """
    if comm is None:
        if failure is not None:
            raise failure
        return [int(count)]
    everyone = comm.allgather((int(count), _as_message(failure)))
    _raise_first_failure([why for _, why in everyone], "data")
    if sum(n for n, _ in everyone) == 0:
        raise ValueError("data is empty on every rank: got 0 samples in all")
    return [n for n, _ in everyone]


def global_count_or_raise(comm, count, failure=None):
    """Return the sum of a sample count over the ranks (:func:`rank_counts_or_raise`)."""
    return sum(rank_counts_or_raise(comm, count, failure))


def first_sample(comm, counts):
    """Global index of this rank's first sample: the counts of the ranks before it."""
    return 0 if comm is None else sum(counts[:comm.Get_rank()])


def check_agreement(comm, model, params, loss=None, failure=None):
    """Raise on every rank unless all ranks have the same model, loss and params.

    Compared: the model's structure (its layers' repr and input shape), the loss
    (its repr), the parameters' length and dtype, and a CRC-32 of their bytes (read in
    place: 0.6 ms for 2.7 MB, where a copy and a SHA-256 took 3 ms in every call).
    ``failure``: this rank's error in checking its parameters (``params`` then
    None), raised on every rank with the rank that had it.
    """
    if comm is None or comm.Get_size() == 1:
        if failure is not None:
            raise failure
        return
    mine = {
        "failure": _as_message(failure),
        "model": f"{model.input_shape} {model!r}",
        "loss": repr(loss),
        "params": None if params is None else (int(params.size), str(params.dtype)),
        "checksum": None if params is None else zlib.crc32(
            memoryview(np.ascontiguousarray(params)).cast("B")),
    }
    everyone = comm.allgather(mine)
    _raise_first_failure([other["failure"] for other in everyone], "parameters")
    for key in ("model", "loss", "params", "checksum"):
        differ = [r for r, other in enumerate(everyone) if other[key] != everyone[0][key]]
        if differ:
            what = {"model": "the model's structure", "loss": "the loss",
                    "params": "the parameters' length or dtype",
                    "checksum": "the parameters' values"}[key]
            raise ValueError(f"ranks disagree on {what}: rank(s) {differ} differ from rank 0 "
                             f"(every rank must pass the same model, loss and parameters; "
                             f"only the data is sharded)")
