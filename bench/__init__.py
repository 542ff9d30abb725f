"""Benchmarks of ghess against NumPy, PyTorch, JAX and curvlinops.

``python bench/run.py`` runs the suite and writes its report; ``python bench/ab.py``
compares two builds of ghess. The modules:

- ``problems``: the networks, batches, weights, data and directions of every problem;
- ``competitors``: one module per implementation, each returning its timed operations;
- ``flops``: the flops of each operation, counted from the layers or nominal;
- ``gemm``: the machine's GEMM rates (the peak, and each library's BLAS);
- ``timing``: worker pinning, medians, interleaved rounds, peak memory;
- ``report``: the targets, and ``RESULTS.md`` / ``results.json``;
- ``_internals``: the only module that uses ghess's private modules.

Importing this package imports nothing else: a worker sets its thread counts and core
affinity before numpy is imported.
"""
