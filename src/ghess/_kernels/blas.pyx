"""Row-major wrappers over ``scipy.linalg.cython_blas``.

Design notes
------------
1. ghess stores every matrix in C (row-major) order. BLAS is column-major, so
   ``C = op(A) op(B)`` in row-major is computed as ``C^T = op(B)^T op(A)^T`` in
   column-major: swap the operands and the dimensions ``m`` and ``n``.
2. Pointers into const memoryviews are cast to non-const here, because the
   Fortran-style BLAS prototypes are not const-correct; BLAS never writes to
   ``a`` or ``b``.
3. ``gemm`` and ``syrk`` are fused over float32/float64 and run without the GIL;
   they are called from the nogil kernels of ``dense.pyx`` and ``conv.pyx``.
"""
from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, dsyrk, sgemm, ssyrk


cdef void gemm(bint trans_a, bint trans_b, int m, int n, int k,
               floating alpha, const floating* a, int lda,
               const floating* b, int ldb,
               floating beta, floating* c, int ldc) noexcept nogil:
    # c[m, n] := alpha * op(a)[m, k] @ op(b)[k, n] + beta * c, all row-major.
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m <= 0 or n <= 0:
        return
    # BLAS rejects leading dimensions below 1, which row-major views of
    # empty arrays can produce.
    lda = max(lda, 1)
    ldb = max(ldb, 1)
    ldc = max(ldc, 1)
    if floating is double:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*> b, &ldb,
              <double*> a, &lda, &beta, c, &ldc)
    else:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*> b, &ldb,
              <float*> a, &lda, &beta, c, &ldc)


cdef void syrk_lower(bint trans, int n, int k, floating alpha, const floating* a, int lda,
                     floating beta, floating* c, int ldc) noexcept nogil:
    # The lower triangle (row-major) of c[n, n] := alpha * A A^T + beta * c, A = a[n, k]
    # row-major, or A = a^T for a[k, n] with ``trans``: half a GEMM's flops for a Gram
    # matrix. Row-major lower is column-major upper, and row-major a[n, k] is
    # column-major a^T, so A A^T is op(a^T)^T op(a^T) with op = 'T' (``trans``: 'N').
    cdef char uplo = b'U'
    cdef char t = b'N' if trans else b'T'
    if n <= 0:
        return
    lda = max(lda, 1)
    ldc = max(ldc, 1)
    if floating is double:
        dsyrk(&uplo, &t, &n, &k, &alpha, <double*> a, &lda, &beta, c, &ldc)
    else:
        ssyrk(&uplo, &t, &n, &k, &alpha, <float*> a, &lda, &beta, c, &ldc)
