/* The weight gradient g^T x of a dense layer with few outputs (a classifier's last
 * layer: 10 classes), row-major:
 *
 *   ghess_skinny_tn:  out[r, o] (+)= sum_i a[i, r] b[i, o]    r < m small
 *
 * OpenBLAS packs both operands even of a product whose output is only m rows tall,
 * and the packing then costs more than the arithmetic: such a product runs far below
 * the GEMM's peak. This reads b once, in column blocks small enough that the m output
 * rows of a block stay in L1 across all of b's rows, and is faster than BLAS in both
 * dtypes, in warm and cold caches. The sum over i runs in one order whatever block of
 * columns a thread takes, so results do not depend on the number of threads.
 *
 * (x W^T and g W with few rows in W stay with BLAS: there it is faster than the
 * contractions of contract.h with one shared D.)
 */
#ifndef GHESS_SKINNY_H
#define GHESS_SKINNY_H

#include <stddef.h>

#include "portability.h" /* GHESS_ISA_VARIANTS, GHESS_ISA_CALL, GHESS_SIMD */

/* Largest m taken here: by m = 16, BLAS's packing pays off (in float64 first). */
#define GHESS_SKINNY_MAX 12

/* Bytes of one output row per column block: m rows of it plus four rows of b stay in L1. */
#define GHESS_SKINNY_BLOCK_BYTES 1024

/* one build (NAME) at one ISA level (ATTR) */
#define GHESS_DEFINE_SKINNY(T, NAME, UNUSED, ATTR)                                        \
ATTR static void NAME(const T *restrict a, ptrdiff_t lda, const T *restrict b,            \
                      ptrdiff_t ldb, T *restrict out, ptrdiff_t ldo, ptrdiff_t m,         \
                      ptrdiff_t k, ptrdiff_t n, int accumulate)                           \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    const ptrdiff_t block = GHESS_SKINNY_BLOCK_BYTES / (ptrdiff_t)sizeof(T);              \
    for (ptrdiff_t o0 = 0; o0 < n; o0 += block) {                                         \
        ptrdiff_t len = n - o0 < block ? n - o0 : block;                                  \
        if (!accumulate) {                                                                \
            for (ptrdiff_t r = 0; r < m; r++) {                                           \
                T *restrict dst = out + r * ldo + o0;                                     \
                GHESS_SIMD                                                                \
                for (ptrdiff_t o = 0; o < len; o++)                                       \
                    dst[o] = 0;                                                           \
            }                                                                             \
        }                                                                                 \
        ptrdiff_t i = 0;                                                                  \
        for (; i + 4 <= k; i += 4) {                                                      \
            const T *b0 = b + i * ldb + o0, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb; \
            const T *a0 = a + i * lda;                                                    \
            for (ptrdiff_t r = 0; r < m; r++) {                                           \
                T w0 = a0[r], w1 = a0[lda + r], w2 = a0[2 * lda + r], w3 = a0[3 * lda + r]; \
                T *restrict dst = out + r * ldo + o0;                                     \
                GHESS_SIMD                                                                \
                for (ptrdiff_t o = 0; o < len; o++)                                       \
                    dst[o] += (w0 * b0[o] + w1 * b1[o]) + (w2 * b2[o] + w3 * b3[o]);      \
            }                                                                             \
        }                                                                                 \
        for (; i < k; i++) {                                                              \
            const T *b0 = b + i * ldb + o0;                                               \
            for (ptrdiff_t r = 0; r < m; r++) {                                           \
                T w0 = a[i * lda + r];                                                    \
                T *restrict dst = out + r * ldo + o0;                                     \
                GHESS_SIMD                                                                \
                for (ptrdiff_t o = 0; o < len; o++)                                       \
                    dst[o] += w0 * b0[o];                                                 \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}

/* every level's builds, and the function that calls the one in use */
#define GHESS_DEFINE_SKINNIES(T, SUFFIX)                                                  \
GHESS_ISA_VARIANTS(GHESS_DEFINE_SKINNY, T, ghess_skinny_tn_##SUFFIX, 0)                   \
static void ghess_skinny_tn_##SUFFIX(const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, \
                                     T *out, ptrdiff_t ldo, ptrdiff_t m, ptrdiff_t k,     \
                                     ptrdiff_t n, int accumulate)                         \
{                                                                                         \
    GHESS_ISA_CALL(ghess_skinny_tn_##SUFFIX, (a, lda, b, ldb, out, ldo, m, k, n,          \
                                              accumulate));                               \
}

GHESS_DEFINE_SKINNIES(double, f64)
GHESS_DEFINE_SKINNIES(float, f32)

#endif
