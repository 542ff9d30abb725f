/* Per-channel maps of a convolution's output, one sample (or one channel) at a time:
 *
 *   ghess_channel_affine   y[j, m, :] (+)= a[j, m] x[j, m, :] + b[j, m]   (bias, batch norm)
 *   ghess_pairwise_sum     sum of x[:count] (y NULL) or of x[:count] * y[:count], in double
 *   ghess_pairwise_sum_samples
 *                          the same over n samples' rows, added in sample order
 *
 * The biases' and batch norm's gradients are pairwise sums over each channel's positions.
 * Each function is built once per ISA level (GHESS_ISA_VARIANTS) and called at the
 * module's level; all levels give the same bits (elementwise maps without FMA
 * contraction; the pairwise sum keeps its order whatever the vector width).
 */
#ifndef GHESS_CHANNEL_H
#define GHESS_CHANNEL_H

#include <stddef.h>

#include "portability.h" /* GHESS_ISA_VARIANTS, GHESS_ISA_CALL, GHESS_NO_CONTRACT, GHESS_SIMD */

/* One sample's k directions of M channels of P positions. An operand with one row (the
 * direction axis of x: kx == 1, of a: ka == 1, of b: kb == 1) serves every direction; b
 * NULL adds nothing; a NULL is a bias alone, y = x + b (accumulate is not read). y may be
 * x (in place, with kx == k): each position is read before it is written, so `omp simd`
 * holds without restrict. */
#define GHESS_DEFINE_CHANNEL_AFFINE(T, NAME, UNUSED, ATTR)                                \
ATTR static void NAME(const T *x, int kx, const T *restrict a, int ka, const T *restrict b, \
                      int kb, T *y, int k, int M, ptrdiff_t P,                            \
                      int accumulate)                                                     \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    for (int j = 0; j < k; j++)                                                           \
        for (int m = 0; m < M; m++) {                                                     \
            const T scale = a ? a[(ka > 1 ? j : 0) * M + m] : (T)1;                       \
            const T shift = b ? b[(kb > 1 ? j : 0) * M + m] : (T)0;                       \
            const T *xr = x + ((ptrdiff_t)(kx > 1 ? j : 0) * M + m) * P;                  \
            T *yr = y + ((ptrdiff_t)j * M + m) * P;                                       \
            if (!a) {                                                                     \
                GHESS_SIMD                                                                \
                for (ptrdiff_t p = 0; p < P; p++)                                         \
                    yr[p] = xr[p] + shift;                                                \
            } else if (accumulate) {                                                      \
                GHESS_SIMD                                                                \
                for (ptrdiff_t p = 0; p < P; p++)                                         \
                    yr[p] = yr[p] + (scale * xr[p] + shift);                              \
            } else {                                                                      \
                GHESS_SIMD                                                                \
                for (ptrdiff_t p = 0; p < P; p++)                                         \
                    yr[p] = scale * xr[p] + shift;                                        \
            }                                                                             \
        }                                                                                 \
}

/* The sum of x[:count] (y NULL) or the dot product of x and y, pairwise as NumPy sums:
 * blocks of up to 128 terms in 8 interleaved partial sums, the blocks combined pairwise.
 * The error grows with log2(count) ulp instead of count (a bias sums N * H * W terms:
 * 1e-13 off on 33x33 maps when summed in one chain), and the 8 independent chains run
 * several times faster than one. Terms are doubles: float32 data sums in double. */
#define GHESS_PAIRWISE_BLOCK(TERM)                                                        \
    do {                                                                                  \
        if (count < 8) {                                                                  \
            for (ptrdiff_t p = 0; p < count; p++)                                         \
                total += TERM(p);                                                         \
            break;                                                                        \
        }                                                                                 \
        double r0 = TERM(0), r1 = TERM(1), r2 = TERM(2), r3 = TERM(3);                    \
        double r4 = TERM(4), r5 = TERM(5), r6 = TERM(6), r7 = TERM(7);                    \
        ptrdiff_t p = 8;                                                                  \
        for (; p + 8 <= count; p += 8) {                                                  \
            r0 += TERM(p);                                                                \
            r1 += TERM(p + 1);                                                            \
            r2 += TERM(p + 2);                                                            \
            r3 += TERM(p + 3);                                                            \
            r4 += TERM(p + 4);                                                            \
            r5 += TERM(p + 5);                                                            \
            r6 += TERM(p + 6);                                                            \
            r7 += TERM(p + 7);                                                            \
        }                                                                                 \
        total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7));                        \
        for (; p < count; p++)                                                            \
            total += TERM(p);                                                             \
    } while (0)
#define GHESS_PAIRWISE_SUM_TERM(p) ((double)x[p])
#define GHESS_PAIRWISE_DOT_TERM(p) ((double)x[p] * (double)y[p])
#define GHESS_DEFINE_PAIRWISE(T, NAME, UNUSED, ATTR)                                      \
ATTR static double NAME(const T *x, const T *y, ptrdiff_t count)                          \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    if (count > 128) {                                                                    \
        ptrdiff_t half = (count / 2) / 8 * 8;                                             \
        return NAME(x, y, half) + NAME(x + half, y ? y + half : NULL, count - half);      \
    }                                                                                     \
    double total = 0.0;                                                                   \
    if (y)                                                                                \
        GHESS_PAIRWISE_BLOCK(GHESS_PAIRWISE_DOT_TERM);                                    \
    else                                                                                  \
        GHESS_PAIRWISE_BLOCK(GHESS_PAIRWISE_SUM_TERM);                                    \
    return total;                                                                         \
}                                                                                         \
/* and over n samples (x + i * x_stride, y + i * y_stride), added in sample order: one   */ \
/* channel's bias or batch-norm scale gradient, with one dispatch per channel            */ \
ATTR static double NAME##_samples(const T *x, ptrdiff_t x_stride, const T *y,             \
                                  ptrdiff_t y_stride, ptrdiff_t n, ptrdiff_t count)       \
{                                                                                         \
    double acc = 0.0;                                                                     \
    for (ptrdiff_t i = 0; i < n; i++)                                                     \
        acc = acc + NAME(x + i * x_stride, y ? y + i * y_stride : NULL, count);           \
    return acc;                                                                           \
}

/* every level's builds, and the functions that call the one in use */
#define GHESS_DEFINE_CHANNEL(T, SUFFIX)                                                   \
GHESS_ISA_VARIANTS(GHESS_DEFINE_CHANNEL_AFFINE, T, ghess_channel_affine_##SUFFIX, 0)      \
GHESS_ISA_VARIANTS(GHESS_DEFINE_PAIRWISE, T, ghess_pairwise_sum_##SUFFIX, 0)              \
static void ghess_channel_affine_##SUFFIX(const T *x, int kx, const T *a, int ka,         \
                                          const T *b, int kb, T *y, int k, int M,         \
                                          ptrdiff_t P, int accumulate)                    \
{                                                                                         \
    GHESS_ISA_CALL(ghess_channel_affine_##SUFFIX, (x, kx, a, ka, b, kb, y, k, M, P,       \
                                                   accumulate));                          \
}                                                                                         \
static double ghess_pairwise_sum_##SUFFIX(const T *x, const T *y, ptrdiff_t count)        \
{                                                                                         \
    return GHESS_ISA_SELECT(ghess_pairwise_sum_##SUFFIX, )(x, y, count);                  \
}                                                                                         \
static double ghess_pairwise_sum_samples_##SUFFIX(const T *x, ptrdiff_t x_stride,         \
                                                  const T *y, ptrdiff_t y_stride,         \
                                                  ptrdiff_t n, ptrdiff_t count)           \
{                                                                                         \
    return GHESS_ISA_SELECT(ghess_pairwise_sum_##SUFFIX, _samples)(x, x_stride, y,        \
                                                                   y_stride, n, count);   \
}

GHESS_DEFINE_CHANNEL(double, f64)
GHESS_DEFINE_CHANNEL(float, f32)

#endif
