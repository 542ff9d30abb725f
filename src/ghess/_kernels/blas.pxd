# Row-major BLAS wrappers: the only place in ghess that calls scipy.linalg.cython_blas.
from cython cimport floating


cdef void gemm(bint trans_a, bint trans_b, int m, int n, int k,
               floating alpha, const floating* a, int lda,
               const floating* b, int ldb,
               floating beta, floating* c, int ldc) noexcept nogil

cdef void syrk_lower(bint trans, int n, int k, floating alpha, const floating* a, int lda,
                     floating beta, floating* c, int ldc) noexcept nogil
