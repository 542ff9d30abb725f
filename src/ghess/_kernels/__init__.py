"""The compiled kernels of ghess: Cython over BLAS and the C kernels of ``include/``.

Internal. The Python layers call these with validated, contiguous arrays of the
right dtype; a kernel checks only that the shapes of its arguments agree.

Modules
-------
dense
    Dense layers, activations and losses: ``gemm_rowmajor`` (BLAS, split over
    OpenMP threads), bias sums, activation values and derivatives, the per-sample
    Jacobian-factor contractions and ``ggn_factor_core``, per-sample loss values and
    gradients, ``output_hessian_apply``; ``openmp_enabled``, ``openmp_max_threads``.
    The enums ``ActivationKind`` and ``OutputHessianKind`` name the ``kind``
    argument of the activation and output-Hessian kernels.
conv
    Convolution and pooling layers: im2col/col2im, the direct (AVX2/FMA)
    convolutions, the GEMMs over samples and directions, max and average pooling.
blas
    Row-major ``gemm`` over ``scipy.linalg.cython_blas`` for the other modules
    (a ``cdef`` function: ``blas.pxd``); nothing Python-visible.
alloc
    The NumPy memory handler that keeps freed large temporaries for reuse:
    ``set_limit``, ``use_pool``, ``restore``, ``release``, ``stats``.

C-level declarations: ``headers.pxd`` (the functions of ``include/*.h`` that
``dense`` and ``conv`` call), ``dense.pxd`` (the kind enums), ``blas.pxd``.
``include/portability.h`` holds the compiler, CPU and OpenMP tests of the headers.
"""
