"""The compiled kernels of ghess (Cython over BLAS and the C headers of ``include/``).

Internal: the Python layers call these with validated, contiguous arrays of the
right dtype; the kernels check only that the shapes agree.

Modules
-------
dense
    Kernels of dense layers, activations and losses: ``gemm_rowmajor`` (BLAS split
    over OpenMP threads), bias sums, activation values and derivatives, the
    per-sample Jacobian-factor contractions and ``ggn_factor_core``, per-sample
    loss values and gradients, ``output_hessian_apply``; ``openmp_enabled`` and
    ``openmp_max_threads``. Its enums ``ActivationKind`` and ``OutputHessianKind``
    name the ``kind`` argument of the activation and output-Hessian kernels.
conv
    Kernels of convolution and pooling layers: im2col/col2im, the direct
    (AVX2/FMA) convolutions, the GEMMs over samples and directions, max and
    average pooling.
blas
    Row-major ``gemm`` over ``scipy.linalg.cython_blas``, for cimport only
    (``blas.pxd``); the only caller of BLAS.
alloc
    A NumPy memory handler that keeps freed large temporaries for reuse
    (``set_limit``, ``use_pool``, ``restore``, ``release``, ``stats``).

The ``.pxd`` files declare what the modules share at C level; ``include/`` holds
the C kernels, with the compiler and platform tests in ``include/portability.h``.
"""
