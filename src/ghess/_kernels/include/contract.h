/* Per-sample contractions with a stored Jacobian factor D (K, m), the
 * non-GEMM part of a stored GGN product:
 *
 *   forward   out[j, c] (+)= sum_o D[c, o] u[j, o]   (J v, k directions)
 *   transpose out[j, o] (+)= sum_c w[j, c] D[c, o]    (J^T w)
 *
 * K (network outputs) is small and m (a layer's width) large. A BLAS call per
 * (j, c) dot, or per sample with k = 1, is dominated by call and packing
 * overhead, even with the rows in cache; these loops take four rows of D per
 * pass (eight in the transpose), so u (or out) is read once per pass, and
 * `omp simd` lets the compiler reassociate the sums into vector lanes. Built for
 * the baseline, AVX2 and AVX-512, the level in use picked at run time (GHESS_ISA,
 * portability.h); the lanes differ, so the levels agree to rounding. Results depend
 * only on the sample and the level, not on the thread count.
 */
#ifndef GHESS_CONTRACT_H
#define GHESS_CONTRACT_H

#include <stddef.h>

#include "portability.h" /* GHESS_ISA_VARIANTS, GHESS_ISA_CALL, GHESS_SIMD, GHESS_SIMD_SUM* */

/* One pass of the transpose over rows c.. of D: dst = (or +=) the weighted sum EXPR of
 * those rows at column o. Up to eight rows per pass: dst is read and written once per
 * eight rows of D, and the first pass writes it without reading (no zeroing pass). */
#define GHESS_T_PASS(first, EXPR)                                                         \
    do {                                                                                  \
        if (first) {                                                                      \
            GHESS_SIMD                                                                    \
            for (ptrdiff_t o = 0; o < len; o++)                                           \
                dst[o] = EXPR;                                                            \
        } else {                                                                          \
            GHESS_SIMD                                                                    \
            for (ptrdiff_t o = 0; o < len; o++)                                           \
                dst[o] += EXPR;                                                           \
        }                                                                                 \
    } while (0)

/* Columns of the transpose per block: out's block stays in L1 across the K rows. */
#define GHESS_CONTRACT_BLOCK 1024

/* J v: one build (NAME) at one ISA level (ATTR) */
#define GHESS_DEFINE_CONTRACT(T, NAME, UNUSED, ATTR)                                      \
ATTR static void NAME(const T *restrict D, const T *restrict u, T *restrict out,          \
                      ptrdiff_t K, ptrdiff_t m, ptrdiff_t k, int accumulate)              \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    for (ptrdiff_t j = 0; j < k; j++) {                                                   \
        const T *restrict uj = u + j * m;                                                 \
        T *restrict oj = out + j * K;                                                     \
        ptrdiff_t c = 0;                                                                  \
        for (; c + 4 <= K; c += 4) {                                                      \
            const T *d0 = D + c * m, *d1 = d0 + m, *d2 = d1 + m, *d3 = d2 + m;            \
            T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                             \
            GHESS_SIMD_SUM4                                                               \
            for (ptrdiff_t o = 0; o < m; o++) {                                           \
                T x = uj[o];                                                              \
                s0 += d0[o] * x;                                                          \
                s1 += d1[o] * x;                                                          \
                s2 += d2[o] * x;                                                          \
                s3 += d3[o] * x;                                                          \
            }                                                                             \
            oj[c] = accumulate ? oj[c] + s0 : s0;                                         \
            oj[c + 1] = accumulate ? oj[c + 1] + s1 : s1;                                 \
            oj[c + 2] = accumulate ? oj[c + 2] + s2 : s2;                                 \
            oj[c + 3] = accumulate ? oj[c + 3] + s3 : s3;                                 \
        }                                                                                 \
        for (; c < K; c++) {                                                              \
            const T *d0 = D + c * m;                                                      \
            T s0 = 0;                                                                     \
            GHESS_SIMD_SUM1                                                               \
            for (ptrdiff_t o = 0; o < m; o++)                                             \
                s0 += d0[o] * uj[o];                                                      \
            oj[c] = accumulate ? oj[c] + s0 : s0;                                         \
        }                                                                                 \
    }                                                                                     \
}

/* J^T w: one build (NAME) at one ISA level (ATTR) */
#define GHESS_DEFINE_CONTRACT_T(T, NAME, UNUSED, ATTR)                                    \
ATTR static void NAME(const T *restrict D, const T *restrict w, T *restrict out,          \
                      ptrdiff_t K, ptrdiff_t m, ptrdiff_t k, int accumulate)              \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    for (ptrdiff_t j = 0; j < k; j++) {                                                   \
        const T *restrict wj = w + j * K;                                                 \
        for (ptrdiff_t o0 = 0; o0 < m; o0 += GHESS_CONTRACT_BLOCK) {                      \
            ptrdiff_t len = m - o0 < GHESS_CONTRACT_BLOCK ? m - o0 : GHESS_CONTRACT_BLOCK; \
            T *restrict dst = out + j * m + o0;                                           \
            const T *base = D + o0;                                                       \
            int first = !accumulate; /* the first pass writes dst, the others add */      \
            ptrdiff_t c = 0;                                                              \
            for (; c + 8 <= K; c += 8, first = 0) {                                       \
                const T *d = base + c * m;                                                \
                const T *w_ = wj + c;                                                     \
                GHESS_T_PASS(first, (w_[0] * d[o] + w_[1] * d[m + o])                     \
                                    + (w_[2] * d[2 * m + o] + w_[3] * d[3 * m + o])       \
                                    + ((w_[4] * d[4 * m + o] + w_[5] * d[5 * m + o])      \
                                    + (w_[6] * d[6 * m + o] + w_[7] * d[7 * m + o])));    \
            }                                                                             \
            for (; c + 4 <= K; c += 4, first = 0) {                                       \
                const T *d = base + c * m;                                                \
                const T *w_ = wj + c;                                                     \
                GHESS_T_PASS(first, (w_[0] * d[o] + w_[1] * d[m + o])                     \
                                    + (w_[2] * d[2 * m + o] + w_[3] * d[3 * m + o]));     \
            }                                                                             \
            for (; c + 2 <= K; c += 2, first = 0) {                                       \
                const T *d = base + c * m;                                                \
                const T *w_ = wj + c;                                                     \
                GHESS_T_PASS(first, w_[0] * d[o] + w_[1] * d[m + o]);                     \
            }                                                                             \
            for (; c < K; c++, first = 0) {                                               \
                const T *d = base + c * m;                                                \
                const T w0 = wj[c];                                                       \
                GHESS_T_PASS(first, w0 * d[o]);                                           \
            }                                                                             \
            if (first) {  /* K == 0 */                                                    \
                GHESS_SIMD                                                                \
                for (ptrdiff_t o = 0; o < len; o++)                                       \
                    dst[o] = 0;                                                           \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}

/* every level's builds, and the function that calls the one in use */
#define GHESS_DEFINE_CONTRACTS(T, SUFFIX)                                                 \
GHESS_ISA_VARIANTS(GHESS_DEFINE_CONTRACT, T, ghess_contract_##SUFFIX, 0)                  \
GHESS_ISA_VARIANTS(GHESS_DEFINE_CONTRACT_T, T, ghess_contract_t_##SUFFIX, 0)              \
static void ghess_contract_##SUFFIX(const T *D, const T *u, T *out, ptrdiff_t K,          \
                                    ptrdiff_t m, ptrdiff_t k, int accumulate)             \
{                                                                                         \
    GHESS_ISA_CALL(ghess_contract_##SUFFIX, (D, u, out, K, m, k, accumulate));            \
}                                                                                         \
static void ghess_contract_t_##SUFFIX(const T *D, const T *w, T *out, ptrdiff_t K,        \
                                      ptrdiff_t m, ptrdiff_t k, int accumulate)           \
{                                                                                         \
    GHESS_ISA_CALL(ghess_contract_t_##SUFFIX, (D, w, out, K, m, k, accumulate));          \
}

GHESS_DEFINE_CONTRACTS(double, f64)
GHESS_DEFINE_CONTRACTS(float, f32)

#endif
