/* Branch-free float64 (and float32, at the end) tanh that GCC vectorises (AVX2: 4 lanes).
 *
 * libm's tanh is a scalar call with branches, so the activation loop around it
 * cannot be vectorised, and it made tanh the costliest part of a tanh network's
 * forward pass. Here every lane runs the same straight-line code: selects instead
 * of jumps, exp's 2^k built from the exponent bits.
 *
 * Accuracy: exp(r) and expm1(u) are Taylor polynomials on ranges where the
 * truncation error is below 1e-17 relative; the result is within 3 ulp of libm
 * on a dense grid (tests/_kernels/test_vecmath.py allows 4 over grids and random
 * points), and the derivatives' formulas are those of the scalar kernel.
 */
#ifndef GHESS_VECMATH_H
#define GHESS_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>

#include "portability.h" /* GHESS_CLONES */

/* 1/k! for k = 2..18, each rounded once */
#define GHESS_INV_FACT_2 0.5
#define GHESS_INV_FACT_3 (1.0 / 6.0)
#define GHESS_INV_FACT_4 (1.0 / 24.0)
#define GHESS_INV_FACT_5 (1.0 / 120.0)
#define GHESS_INV_FACT_6 (1.0 / 720.0)
#define GHESS_INV_FACT_7 (1.0 / 5040.0)
#define GHESS_INV_FACT_8 (1.0 / 40320.0)
#define GHESS_INV_FACT_9 (1.0 / 362880.0)
#define GHESS_INV_FACT_10 (1.0 / 3628800.0)
#define GHESS_INV_FACT_11 (1.0 / 39916800.0)
#define GHESS_INV_FACT_12 (1.0 / 479001600.0)
#define GHESS_INV_FACT_13 (1.0 / 6227020800.0)
#define GHESS_INV_FACT_14 (1.0 / 87178291200.0)
#define GHESS_INV_FACT_15 (1.0 / 1307674368000.0)
#define GHESS_INV_FACT_16 (1.0 / 20922789888000.0)
#define GHESS_INV_FACT_17 (1.0 / 355687428096000.0)
#define GHESS_INV_FACT_18 (1.0 / 6402373705728000.0)

/* exp(u) for u in [-45, 0]: u = k ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor
 * polynomial of degree 13 (remainder < 1e-17 relative), times 2^k from its bits.
 * k is rounded by adding 1.5 * 2^52 (whose ulp is 1), not by floor(): floor is a
 * libm call without SSE4.1, and a call stops the vectoriser. */
static inline double ghess_exp_nonpositive(double u)
{
    const double log2e = 1.4426950408889634;
    /* ln 2 split so that k * ln2_hi is exact for |k| < 2^11 */
    const double ln2_hi = 0.693145751953125;
    const double ln2_lo = 1.4286068203094173e-06;
    const double shifter = 6755399441055744.0; /* 1.5 * 2^52 */
    double shifted = u * log2e + shifter;      /* k + shifter, k = round(u log2 e) */
    double k = shifted - shifter;
    double r = (u - k * ln2_hi) - k * ln2_lo;
    double p = GHESS_INV_FACT_13;
    p = p * r + GHESS_INV_FACT_12;
    p = p * r + GHESS_INV_FACT_11;
    p = p * r + GHESS_INV_FACT_10;
    p = p * r + GHESS_INV_FACT_9;
    p = p * r + GHESS_INV_FACT_8;
    p = p * r + GHESS_INV_FACT_7;
    p = p * r + GHESS_INV_FACT_6;
    p = p * r + GHESS_INV_FACT_5;
    p = p * r + GHESS_INV_FACT_4;
    p = p * r + GHESS_INV_FACT_3;
    p = p * r + GHESS_INV_FACT_2;
    p = p * r + 1.0;
    p = p * r + 1.0;
    double scale;
    int64_t bits, base;
    memcpy(&bits, &shifted, sizeof bits);
    memcpy(&base, &shifter, sizeof base);
    bits = (bits - base + 1023) << 52; /* the double 2^k, k in [-65, 0] */
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* expm1(u) for u in (-0.7, 0]: Taylor polynomial of degree 18 (remainder < 1e-20; no
 * cancellation). Below -0.7, exp(u) - 1 loses less than an ulp: exp(u) < 1/2. */
static inline double ghess_expm1_small(double u)
{
    double q = GHESS_INV_FACT_18;
    q = q * u + GHESS_INV_FACT_17;
    q = q * u + GHESS_INV_FACT_16;
    q = q * u + GHESS_INV_FACT_15;
    q = q * u + GHESS_INV_FACT_14;
    q = q * u + GHESS_INV_FACT_13;
    q = q * u + GHESS_INV_FACT_12;
    q = q * u + GHESS_INV_FACT_11;
    q = q * u + GHESS_INV_FACT_10;
    q = q * u + GHESS_INV_FACT_9;
    q = q * u + GHESS_INV_FACT_8;
    q = q * u + GHESS_INV_FACT_7;
    q = q * u + GHESS_INV_FACT_6;
    q = q * u + GHESS_INV_FACT_5;
    q = q * u + GHESS_INV_FACT_4;
    q = q * u + GHESS_INV_FACT_3;
    q = q * u + GHESS_INV_FACT_2;
    q = q * u + 1.0;
    return q * u;
}

/* tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)); tanh(20) rounds to 1 */
static inline double ghess_tanh(double x)
{
    double a = fabs(x);
    a = a < 20.0 ? a : 20.0;  /* also maps +-inf to 20 */
    double u = -2.0 * a;
    double small = ghess_expm1_small(u);
    double big = ghess_exp_nonpositive(u) - 1.0;
    double em = u > -0.7 ? small : big;
    return copysign(-em / (2.0 + em), x);
}

/* float32 tanh with the same structure in single precision (AVX2: 8 lanes), for
 * float32 layers: twice the lanes of the float64 one, and faster than NumPy's float32
 * tanh, which it replaces there. Polynomials: exp(r) of degree 7 on |r| <= ln2/2
 * (remainder < 6e-9 relative) and expm1(u) of degree 10 on (-0.7, 0] (< 2e-9);
 * tanh rounds to 1 in float32 from |x| = 9.02, so |x| is clamped at 10. Within
 * 4 float32 ulp of the correctly rounded tanh (tests/_kernels/test_vecmath.py). */
static inline float ghess_tanhf(float x)
{
    const float log2e = 1.44269504f;
    const float ln2_hi = 0.693145751953125f;  /* 15 bits: k * ln2_hi exact for |k| < 2^9 */
    const float ln2_lo = 1.42860677e-06f;
    const float shifter = 12582912.0f;        /* 1.5 * 2^23 */
    float a = fabsf(x);
    a = a < 10.0f ? a : 10.0f;  /* also maps +-inf to 10 */
    float u = -2.0f * a;
    /* expm1(u), u in (-0.7, 0] */
    float q = (float)GHESS_INV_FACT_10;
    q = q * u + (float)GHESS_INV_FACT_9;
    q = q * u + (float)GHESS_INV_FACT_8;
    q = q * u + (float)GHESS_INV_FACT_7;
    q = q * u + (float)GHESS_INV_FACT_6;
    q = q * u + (float)GHESS_INV_FACT_5;
    q = q * u + (float)GHESS_INV_FACT_4;
    q = q * u + (float)GHESS_INV_FACT_3;
    q = q * u + (float)GHESS_INV_FACT_2;
    q = q * u + 1.0f;
    float small = q * u;
    /* exp(u) - 1, u in [-20, -0.7]: 2^k exp(r) */
    float shifted = u * log2e + shifter;
    float k = shifted - shifter;
    float r = (u - k * ln2_hi) - k * ln2_lo;
    float p = (float)GHESS_INV_FACT_7;
    p = p * r + (float)GHESS_INV_FACT_6;
    p = p * r + (float)GHESS_INV_FACT_5;
    p = p * r + (float)GHESS_INV_FACT_4;
    p = p * r + (float)GHESS_INV_FACT_3;
    p = p * r + (float)GHESS_INV_FACT_2;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float scale;
    int32_t bits, base;
    memcpy(&bits, &shifted, sizeof bits);
    memcpy(&base, &shifter, sizeof base);
    bits = (bits - base + 127) << 23; /* the float 2^k, k in [-29, 0] */
    memcpy(&scale, &bits, sizeof scale);
    float big = p * scale - 1.0f;
    float em = u > -0.7f ? small : big;
    return copysignf(-em / (2.0f + em), x);
}

/* y = tanh(x); d1 = 1 - y^2 and d2 = -2 y (1 - y^2) where non-NULL, for float64
 * (ghess_tanh_block) and float32 (ghess_tanhf_block). Where the platform allows it, an
 * AVX2 clone is built beside the baseline (SSE2) one and picked at load time, without
 * FMA so that both clones round alike (GHESS_CLONES, portability.h). */
#define GHESS_DEFINE_TANH_BLOCK(T, NAME, TANH)                                              \
GHESS_CLONES                                                                                \
static void NAME(const T *restrict x, T *restrict y, T *restrict d1, T *restrict d2,        \
                 ptrdiff_t n)                                                               \
{                                                                                           \
    /* one pass per variant: each output is written while t is in a register */             \
    ptrdiff_t i;                                                                            \
    T t;                                                                                    \
    if (d1 && d2) {                                                                         \
        for (i = 0; i < n; i++) {                                                           \
            t = TANH(x[i]);                                                                 \
            y[i] = t;                                                                       \
            d1[i] = (T)1 - t * t;                                                           \
            d2[i] = (T)-2 * t * ((T)1 - t * t);                                             \
        }                                                                                   \
    } else if (d1) {                                                                        \
        for (i = 0; i < n; i++) {                                                           \
            t = TANH(x[i]);                                                                 \
            y[i] = t;                                                                       \
            d1[i] = (T)1 - t * t;                                                           \
        }                                                                                   \
    } else {                                                                                \
        for (i = 0; i < n; i++)                                                             \
            y[i] = TANH(x[i]);                                                              \
        if (d2)  /* not asked for by the layers; kept for completeness */                   \
            for (i = 0; i < n; i++)                                                         \
                d2[i] = (T)-2 * y[i] * ((T)1 - y[i] * y[i]);                                \
    }                                                                                       \
}

GHESS_DEFINE_TANH_BLOCK(double, ghess_tanh_block, ghess_tanh)
GHESS_DEFINE_TANH_BLOCK(float, ghess_tanhf_block, ghess_tanhf)

#endif
