"""The pool of freed temporaries (ghess._kernels.alloc, ghess._config.computing)."""

import os
import platform
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import ghess
from ghess import _config
from ghess._kernels import alloc

try:  # NumPy >= 2
    from numpy._core.multiarray import get_handler_name
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import get_handler_name

MiB = 1 << 20


@pytest.fixture
def pool():
    """Give each test a known, empty pool capped at 64 MiB; restore the cap after."""
    limit = alloc.stats()["limit"]
    alloc.set_limit(64 * MiB)
    yield
    alloc.set_limit(limit)


def _stats_delta(before):
    after = alloc.stats()
    return {key: after[key] - before[key] for key in ("hits", "misses")}


def test_only_arrays_created_while_computing_use_the_pool(pool):
    outside = np.empty(2 * MiB, dtype=np.uint8)
    with _config.computing():
        inside = np.empty(2 * MiB, dtype=np.uint8)
        small = np.empty(10)
    after = np.empty(2 * MiB, dtype=np.uint8)
    assert get_handler_name(inside) == get_handler_name(small) == "ghess_pool"
    assert get_handler_name(outside) == get_handler_name(after) != "ghess_pool"


def test_a_freed_large_block_is_reused_and_only_when_it_fits(pool):
    before = alloc.stats()
    with _config.computing():
        a = np.empty(4 * MiB, dtype=np.uint8)
        address = a.ctypes.data
        del a
        assert alloc.stats()["bytes"] == 4 * MiB
        b = np.empty(4 * MiB - 1000, dtype=np.uint8)      # fits: reused
        assert b.ctypes.data == address
        del b
        c = np.empty(2 * MiB, dtype=np.uint8)             # would waste half: new block
        assert c.ctypes.data != address
        d = np.empty(5 * MiB, dtype=np.uint8)             # too large: new block
        assert d.ctypes.data != address
        tiny = np.empty(1000, dtype=np.uint8)             # below the pool's minimum
        del tiny
    assert _stats_delta(before) == {"hits": 1, "misses": 3}
    del c, d
    assert alloc.stats()["blocks"] == 3


def test_the_cap_keeps_the_newest_blocks_and_release_frees_them(pool):
    alloc.set_limit(10 * MiB)
    with _config.computing():
        blocks = [np.empty(4 * MiB, dtype=np.uint8) for _ in range(3)]
        addresses = [b.ctypes.data for b in blocks]
        for i in range(3):      # freed oldest first
            blocks[i] = None
        # three 4 MiB blocks under a 10 MiB cap: the oldest is released
        assert alloc.stats()["bytes"] == 8 * MiB
        again = [np.empty(4 * MiB, dtype=np.uint8) for _ in range(2)]
        assert sorted(a.ctypes.data for a in again) == sorted(addresses[1:])
        big = np.empty(11 * MiB, dtype=np.uint8)
    del big                                      # larger than the cap: freed at once
    assert alloc.stats()["bytes"] == 0
    del again
    assert ghess.release_memory() == 8 * MiB
    assert alloc.stats()["blocks"] == 0 and ghess.release_memory() == 0


def test_zero_cap_keeps_nothing(pool):
    alloc.set_limit(0)
    with _config.computing():
        a = np.empty(4 * MiB, dtype=np.uint8)
        del a
    assert alloc.stats()["bytes"] == 0


def test_reused_memory_is_zeroed_resized_and_freed_correctly(pool):
    with _config.computing():
        a = np.full(MiB, 7.0)                        # 8 MiB of sevens, then freed
        del a
        z = np.zeros(MiB)                            # calloc from the pooled block
        assert not z.any()
        r = np.arange(3 * MiB // 8, dtype=np.float64)
        r.resize(MiB, refcheck=False)                # realloc of a pooled block
        assert np.array_equal(r[:3 * MiB // 8], np.arange(3 * MiB // 8))
    # freed outside the computation, through the pool's handler
    del z, r
    assert alloc.stats()["blocks"] >= 1


def test_threads_allocating_at_once_get_distinct_intact_blocks(pool):
    errors = []

    def work(seed):
        try:
            with _config.computing():
                for i in range(50):
                    a = np.full((MiB + 8 * (i % 5)) // 8, float(seed))
                    b = np.full(MiB // 8, -float(seed))
                    if not (np.all(a == seed) and np.all(b == -seed)):
                        errors.append(seed)
                    del a, b
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = alloc.stats()
    assert stats["bytes"] <= stats["limit"]


def test_a_thread_takes_back_its_own_block_first(pool):
    # two blocks of one size, one freed by another thread, one by this thread (after):
    # this thread gets its own back, whose cache lines its core holds; the other
    # thread's block still serves a thread that has none of its own
    freed = {}

    def other():
        with _config.computing():
            a = np.empty(3 * MiB, dtype=np.uint8)
            freed["other"] = a.ctypes.data
            del a

    with _config.computing():
        mine = np.empty(3 * MiB, dtype=np.uint8)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        freed["mine"] = mine.ctypes.data
        del mine
        assert alloc.stats()["bytes"] == 6 * MiB
        again = np.empty(3 * MiB, dtype=np.uint8)
        assert again.ctypes.data == freed["mine"]
        second = np.empty(3 * MiB, dtype=np.uint8)
        assert second.ctypes.data == freed["other"]
        del again, second


def test_results_do_not_depend_on_the_pool(pool):
    model = ghess.Sequential(ghess.Conv2d(1, 4, 3, padding=1), ghess.ReLU(), ghess.MaxPool2d(2),
                             ghess.Flatten(), ghess.Linear(4 * 8 * 8, 3), input_shape=(1, 16, 16))
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 1, 16, 16)), rng.integers(0, 3, 40)
    theta = model.init_params(seed=1)
    loss = ghess.CrossEntropyLoss()
    alloc.set_limit(0)
    expected = ghess.loss_and_grad(model, loss, theta, (X, y), chunk_size=7, n_threads=1)
    alloc.set_limit(64 * MiB)
    for _ in range(3):  # later calls run on recycled (dirty) blocks
        value, grad = ghess.loss_and_grad(model, loss, theta, (X, y), chunk_size=7, n_threads=1)
        assert value == expected[0] and np.array_equal(grad, expected[1])


@pytest.mark.parametrize("value, limit", [("", 256 * MiB), ("0", 0), ("1.5", 3 * MiB // 2),
                                          ("  64 ", 64 * MiB)])
def test_pool_size_from_environment(monkeypatch, value, limit):
    monkeypatch.setenv("GHESS_POOL_MB", value)
    assert _config._pool_limit_from_environment() == limit


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_bad_pool_size_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("GHESS_POOL_MB", value)
    with pytest.raises(ValueError, match="GHESS_POOL_MB must be a number of MiB >= 0"):
        _config._pool_limit_from_environment()


FAULTS = textwrap.dedent("""
    import resource
    import numpy as np
    import ghess

    model = ghess.Sequential(
        ghess.Conv2d(3, 16, 3, padding=1), ghess.ReLU(), ghess.MaxPool2d(2),
        ghess.Flatten(), ghess.Linear(16 * 16 * 16, 10), input_shape=(3, 32, 32))
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((256, 3, 32, 32)), rng.integers(0, 10, 256)
    theta = model.init_params(seed=0)
    loss = ghess.CrossEntropyLoss()
    # chunks of 64 samples: 14 MB of unfolded inputs each, allocated and freed per chunk
    run = lambda: ghess.loss_and_grad(model, loss, theta, (X, y), chunk_size=64, n_threads=1)
    for _ in range(2):
        run()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        run()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
""")


def _faults_per_call(pool_mb):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(GHESS_POOL_MB=pool_mb, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux", reason="counts minor page faults")
def test_repeated_loss_and_grad_stops_faulting_pages_in():
    without = _faults_per_call("0")
    if without < 1000:
        pytest.skip(f"this malloc keeps freed memory by itself ({without:.0f} faults/call)")
    with_pool = _faults_per_call("256")
    # ~70 MB of temporaries per call (17000 pages); pooled, only stray pages fault
    assert with_pool < 0.05 * without, (with_pool, without)


def test_bad_pool_size_fails_the_import():
    env = dict(os.environ, GHESS_POOL_MB="lots")
    done = subprocess.run([sys.executable, "-c", "import ghess"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "GHESS_POOL_MB must be a number" in done.stderr


def test_computing_holds_blas_at_one_thread_and_restores_each_library():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        outside = blas_threads()
        assert outside and all(n == 2 for n in outside)
        with _config.computing():
            assert all(n == 1 for n in blas_threads())
            with _config.computing():  # re-entrant: the inner block changes nothing
                assert all(n == 1 for n in blas_threads())
            assert all(n == 1 for n in blas_threads())
        assert blas_threads() == outside
        with pytest.raises(RuntimeError, match="inside"):
            with _config.computing():
                raise RuntimeError("inside")
        assert blas_threads() == outside
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        with _config.computing():
            pass
        assert all(n == 1 for n in blas_threads())
