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

#include "portability.h" /* GHESS_ISA_VARIANTS, GHESS_ISA_CALL, GHESS_NO_CONTRACT */

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

/* exp(u) for u in [-87, 0] in float32: exp(r) of degree 7 on |r| <= ln2/2 (remainder
 * < 6e-9 relative) times 2^k, as ghess_exp_nonpositive */
static inline float ghess_expf_nonpositive(float u)
{
    const float log2e = 1.44269504f;
    const float ln2_hi = 0.693145751953125f;
    const float ln2_lo = 1.42860677e-06f;
    const float shifter = 12582912.0f;  /* 1.5 * 2^23 */
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
    bits = (bits - base + 127) << 23; /* the float 2^k, k in [-126, 0] */
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* expm1(x) for x <= 0 (tanh, ELU): the small-|x| polynomial, else exp(x) - 1 (no
 * cancellation below -0.7); x is clamped at -708 (float64) / -87 (float32), where expm1
 * is -1 anyway. The float32 polynomial has degree 10 on (-0.7, 0] (< 2e-9). */
static inline double ghess_expm1_nonpositive(double x)
{
    double u = x > -708.0 ? x : -708.0;
    u = u < 0.0 ? u : 0.0;
    double small = ghess_expm1_small(u);
    double big = ghess_exp_nonpositive(u) - 1.0;
    return u > -0.7 ? small : big;
}

static inline float ghess_expm1f_nonpositive(float x)
{
    float u = x > -87.0f ? x : -87.0f;
    u = u < 0.0f ? u : 0.0f;
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
    float big = ghess_expf_nonpositive(u) - 1.0f;
    return u > -0.7f ? small : big;
}

/* tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)); tanh(20) rounds to 1 */
static inline double ghess_tanh(double x)
{
    double a = fabs(x);
    a = a < 20.0 ? a : 20.0;  /* also maps +-inf to 20 */
    double em = ghess_expm1_nonpositive(-2.0 * a);
    return copysign(-em / (2.0 + em), x);
}

/* float32 tanh with the same structure in single precision (AVX2: 8 lanes), for
 * float32 layers: twice the lanes of the float64 one, and faster than NumPy's float32
 * tanh, which it replaces there. tanh rounds to 1 in float32 from |x| = 9.02, so |x| is
 * clamped at 10. Within 4 float32 ulp of the correctly rounded tanh
 * (tests/_kernels/test_vecmath.py). */
static inline float ghess_tanhf(float x)
{
    float a = fabsf(x);
    a = a < 10.0f ? a : 10.0f;  /* also maps +-inf to 10 */
    float em = ghess_expm1f_nonpositive(-2.0f * a);
    return copysignf(-em / (2.0f + em), x);
}

/* y = tanh(x); d1 = 1 - y^2 and d2 = -2 y (1 - y^2) where non-NULL, for float64
 * (ghess_tanh_block) and float32 (ghess_tanhf_block). Built for the baseline (SSE2),
 * AVX2 and AVX-512, picked at run time, all without FMA so that every level rounds alike
 * (GHESS_ISA_VARIANTS, portability.h). One build at one level (ATTR): */
#define GHESS_DEFINE_TANH_BLOCK_AT(T, NAME, TANH, ATTR)                                     \
ATTR static void NAME(const T *restrict x, T *restrict y, T *restrict d1, T *restrict d2,   \
                      ptrdiff_t n)                                                          \
{                                                                                           \
    GHESS_NO_CONTRACT                                                                       \
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

/* every level's builds, and the function that calls the one in use */
#define GHESS_DEFINE_TANH_BLOCK(T, NAME, TANH)                                              \
GHESS_ISA_VARIANTS(GHESS_DEFINE_TANH_BLOCK_AT, T, NAME, TANH)                               \
static void NAME(const T *x, T *y, T *d1, T *d2, ptrdiff_t n)                               \
{                                                                                           \
    GHESS_ISA_CALL(NAME, (x, y, d1, d2, n));                                                \
}

GHESS_DEFINE_TANH_BLOCK(double, ghess_tanh_block, ghess_tanh)
GHESS_DEFINE_TANH_BLOCK(float, ghess_tanhf_block, ghess_tanhf)

/* ---- sigmoid and the activations built on it (SiLU, GELU's tanh form), and ELU ----
 *
 * Same straight-line style. sigma(x) and its complement c = 1 - sigma(x) = sigma(-x)
 * both come from e = exp(-|x|) to full relative precision, so sigma' = s c and
 * sigma'' = s c (c - s) stay exact where 1 - s would cancel (|x| > 36.7 in float64).
 * Where exp's result would not be a normal number (|x| > 708 in float64, 87 in
 * float32), it is taken as 0: the exp polynomial runs on a clamped argument, and the
 * result is selected away. */

/* The float64 and float32 twins below are one template each: L(x) writes a literal in T
 * (L(1.0) is 1.0 for double, 1.0f for float: the same decimal, rounded once to T). */
#define GHESS_LITERAL(x) x
#define GHESS_LITERAL_F(x) x##f

#define GHESS_DEFINE_SIGMOID_PAIR(T, NAME, L, FABS, EXP, AMAX)                              \
static inline void NAME(T x, T *s, T *c)                                                    \
{                                                                                           \
    T a = FABS(x);                                                                          \
    T e = EXP(-(a < L(AMAX) ? a : L(AMAX)));  /* +-inf: AMAX */                             \
    e = a < L(AMAX) ? e : L(0.0);                                                           \
    T big = L(1.0) / (L(1.0) + e), small = e / (L(1.0) + e);                                \
    *s = x >= L(0.0) ? big : small;                                                         \
    *c = x >= L(0.0) ? small : big;                                                         \
}

GHESS_DEFINE_SIGMOID_PAIR(double, ghess_sigmoid_pair, GHESS_LITERAL, fabs,
                          ghess_exp_nonpositive, 708.0)
GHESS_DEFINE_SIGMOID_PAIR(float, ghess_sigmoidf_pair, GHESS_LITERAL_F, fabsf,
                          ghess_expf_nonpositive, 87.0)

/* erfc(a) in straight-line code: W. J. Cody's and S. L. Moshier's (Cephes) rational
 * approximations, every range computed and the right one selected: a erf-type ratio in
 * a^2 below |a| = 1 (erfc = 1 - erf), exp(-a^2) times a ratio in |a| on [1, 8) and on
 * [8, inf). exp(-a^2) is taken as 0 where it would not be normal (|a| > XMAX: 26.6 in
 * float64, where erfc is below 1e-308; 9.3 in float32). float64: about 1e-15 relative,
 * with exp(-a^2)'s a^2 eps from rounding a^2. float32 (the same approximations in float32
 * arithmetic, twice the lanes): each is accurate far beyond float32's precision, so the
 * result is within a few float32 ulp, plus exp(-a^2)'s a^2 ulp (< 90 ulp in the far tail,
 * |a| ~ 9, where erfc < 1e-36). One division: the selected range's numerator over its
 * denominator (division is the costly part of this straight-line code). */
#define GHESS_DEFINE_ERFC(T, NAME, L, FABS, EXP, XMAX)                                      \
static inline T NAME(T a)                                                                   \
{                                                                                           \
    T x = FABS(a), z = a * a;                                                               \
    T t = L(9.60497373987051638749E0);                                                      \
    t = t * z + L(9.00260197203842689217E1);                                                \
    t = t * z + L(2.23200534594684319226E3);                                                \
    t = t * z + L(7.00332514112805075473E3);                                                \
    t = t * z + L(5.55923013010394962768E4);                                                \
    T u = z + L(3.35617141647503099647E1);                                                  \
    u = u * z + L(5.21357949780152679795E2);                                                \
    u = u * z + L(4.59432382970980127987E3);                                                \
    u = u * z + L(2.26290000613890934246E4);                                                \
    u = u * z + L(4.92673942608635921086E4);                                                \
    T xc = x < L(XMAX) ? x : L(XMAX);                                                       \
    T e = x < L(XMAX) ? EXP(-(xc * xc)) : L(0.0);                                           \
    T p = L(2.46196981473530512524E-10);                                                    \
    p = p * xc + L(5.64189564831068821977E-1);                                              \
    p = p * xc + L(7.46321056442269912687E0);                                               \
    p = p * xc + L(4.86371970985681366614E1);                                               \
    p = p * xc + L(1.96520832956077098242E2);                                               \
    p = p * xc + L(5.26445194995477358631E2);                                               \
    p = p * xc + L(9.34528527171957607540E2);                                               \
    p = p * xc + L(1.02755188689515710272E3);                                               \
    p = p * xc + L(5.57535335369399327526E2);                                               \
    T q = xc + L(1.32281951154744992508E1);                                                 \
    q = q * xc + L(8.67072140885989742329E1);                                               \
    q = q * xc + L(3.54937778887819891062E2);                                               \
    q = q * xc + L(9.75708501743205489753E2);                                               \
    q = q * xc + L(1.82390916687909736289E3);                                               \
    q = q * xc + L(2.24633760818710981792E3);                                               \
    q = q * xc + L(1.65666309194161350182E3);                                               \
    q = q * xc + L(5.57535340817727675546E2);                                               \
    T r = L(5.64189583547755073984E-1);                                                     \
    r = r * xc + L(1.27536670759978104416E0);                                               \
    r = r * xc + L(5.01905042251180477414E0);                                               \
    r = r * xc + L(6.16021097993053585195E0);                                               \
    r = r * xc + L(7.40974269950448939160E0);                                               \
    r = r * xc + L(2.97886665372100240670E0);                                               \
    T w = xc + L(2.26052863220117276590E0);                                                 \
    w = w * xc + L(9.39603524938001434673E0);                                               \
    w = w * xc + L(1.20489539808096656605E1);                                               \
    w = w * xc + L(1.70814450747565897222E1);                                               \
    w = w * xc + L(9.60896809063285878198E0);                                               \
    w = w * xc + L(3.36907645100081516050E0);                                               \
    T num = x < L(1.0) ? u - a * t : e * (xc < L(8.0) ? p : r);                             \
    T den = x < L(1.0) ? u : (xc < L(8.0) ? q : w);                                         \
    T y = num / den;                                                                        \
    return (x >= L(1.0) && a < L(0.0)) ? L(2.0) - y : y;                                    \
}

GHESS_DEFINE_ERFC(double, ghess_erfc, GHESS_LITERAL, fabs, ghess_exp_nonpositive, 26.6)
GHESS_DEFINE_ERFC(float, ghess_erfcf, GHESS_LITERAL_F, fabsf, ghess_expf_nonpositive, 9.3)

/* the standard normal CDF Phi(v) = erfc(-v / sqrt 2) / 2 and density phi(v); the density's
 * exp is taken as 0 below -HLIM (-708 in float64, -87 in float32) */
#define GHESS_DEFINE_NORMAL_PAIR(T, NAME, L, ERFC, EXP, HLIM)                               \
static inline void NAME(T v, T *cdf, T *pdf)                                                \
{                                                                                           \
    T h = -L(0.5) * v * v;                                                                  \
    *cdf = L(0.5) * ERFC(-v * L(0.7071067811865476));                                       \
    *pdf = h > -L(HLIM) ? L(0.3989422804014327) * EXP(h > -L(HLIM) ? h : -L(HLIM))          \
                        : L(0.0);                                                           \
}

GHESS_DEFINE_NORMAL_PAIR(double, ghess_normal_pair, GHESS_LITERAL, ghess_erfc,
                         ghess_exp_nonpositive, 708.0)
GHESS_DEFINE_NORMAL_PAIR(float, ghess_normalf_pair, GHESS_LITERAL_F, ghess_erfcf,
                         ghess_expf_nonpositive, 87.0)

/* x Phi(x): f' = Phi + x phi, f'' = phi (2 - x^2) */
#define GHESS_GELU_BODY(PAIR)                                                               \
    PAIR(v, &s, &c);                                                                        \
    fy = v * s; f1 = s + v * c; f2 = c * (2 - v * v);

/* BODY reads v (the input) and p0 (the kind's parameter) and sets fy = f(v), f1 = f'(v)
 * and f2 = f''(v); each loop variant writes what is asked for, and the compiler drops
 * what it does not write. One build at one ISA level (ATTR), as the tanh blocks: */
#define GHESS_DEFINE_ACTIVATION_BLOCK_AT(T, NAME, BODY, ATTR)                               \
ATTR static void NAME(const T *restrict x, T *restrict y, T *restrict d1, T *restrict d2,   \
                      ptrdiff_t n, double p0_)                                              \
{                                                                                           \
    GHESS_NO_CONTRACT                                                                       \
    const T p0 = (T)p0_;                                                                    \
    ptrdiff_t i;                                                                            \
    (void)p0;                                                                               \
    if (d1 && d2) {                                                                         \
        for (i = 0; i < n; i++) {                                                           \
            T v = x[i], fy, f1, f2, s, c;                                                   \
            BODY                                                                            \
            y[i] = fy; d1[i] = f1; d2[i] = f2;                                              \
        }                                                                                   \
    } else if (d1) {                                                                        \
        for (i = 0; i < n; i++) {                                                           \
            T v = x[i], fy, f1, f2, s, c;                                                   \
            BODY                                                                            \
            (void)f2;                                                                       \
            y[i] = fy; d1[i] = f1;                                                          \
        }                                                                                   \
    } else {                                                                                \
        for (i = 0; i < n; i++) {                                                           \
            T v = x[i], fy, f1, f2, s, c;                                                   \
            BODY                                                                            \
            (void)f1; (void)f2;                                                             \
            y[i] = fy;                                                                      \
        }                                                                                   \
        if (d2)                                                                             \
            for (i = 0; i < n; i++) {                                                       \
                T v = x[i], fy, f1, f2, s, c;                                               \
                BODY                                                                        \
                (void)fy; (void)f1;                                                         \
                d2[i] = f2;                                                                 \
            }                                                                               \
    }                                                                                       \
}

/* every level's builds, and the function that calls the one in use */
#define GHESS_DEFINE_ACTIVATION_BLOCK(T, NAME, BODY)                                        \
GHESS_ISA_VARIANTS(GHESS_DEFINE_ACTIVATION_BLOCK_AT, T, NAME, BODY)                         \
static void NAME(const T *x, T *y, T *d1, T *d2, ptrdiff_t n, double p0)                    \
{                                                                                           \
    GHESS_ISA_CALL(NAME, (x, y, d1, d2, n, p0));                                            \
}

#define GHESS_SIGMOID_BODY(PAIR)                                                            \
    PAIR(v, &s, &c);                                                                        \
    fy = s; f1 = s * c; f2 = s * c * (c - s);

/* x sigma(x): f' = s (1 + x c), f'' = s c (2 + x (c - s)) */
#define GHESS_SILU_BODY(PAIR)                                                               \
    PAIR(v, &s, &c);                                                                        \
    fy = v * s; f1 = s * (1 + v * c); f2 = s * c * (2 + v * (c - s));

/* 0.5 x (1 + tanh u) = x sigma(2u), u = sqrt(2/pi) (x + 0.044715 x^3):
 * f' = s + 2 x s c u', f'' = 2 s c (2 u' + x (2 (c - s) u'^2 + u'')) */
#define GHESS_GELU_TANH_BODY(PAIR)                                                          \
    PAIR((T)1.5957691216057308 * (v + (T)0.044715 * v * v * v), &s, &c);                     \
    {                                                                                       \
        T u1 = (T)0.7978845608028654 * (1 + (T)0.134145 * v * v);                           \
        T u2 = (T)(0.7978845608028654 * 0.26829) * v;                                       \
        fy = v * s;                                                                         \
        f1 = s + 2 * v * s * c * u1;                                                        \
        f2 = 2 * s * c * (2 * u1 + v * (2 * (c - s) * u1 * u1 + u2));                       \
    }

/* alpha = p0: x for x > 0, else alpha expm1(x); f' = f'' = alpha e^x there, f'(0) = alpha
 * (PyTorch's backward takes the x <= 0 branch at 0) */
#define GHESS_ELU_BODY(EXPM1, EXP, LOW)                                                     \
    s = EXPM1(v);                                                                           \
    /* e^x itself, not expm1 + 1: that is 0 once expm1 rounds to -1 */                      \
    c = v > (T)(LOW) ? EXP(v > (T)0 ? (T)0 : (v > (T)(LOW) ? v : (T)(LOW))) : (T)0;         \
    fy = v > 0 ? v : p0 * s;                                                                \
    f1 = v > 0 ? (T)1 : p0 * c;                                                             \
    f2 = v > 0 ? (T)0 : p0 * c;

#define T double
GHESS_DEFINE_ACTIVATION_BLOCK(double, ghess_sigmoid_block, GHESS_SIGMOID_BODY(ghess_sigmoid_pair))
GHESS_DEFINE_ACTIVATION_BLOCK(double, ghess_silu_block, GHESS_SILU_BODY(ghess_sigmoid_pair))
GHESS_DEFINE_ACTIVATION_BLOCK(double, ghess_gelu_tanh_block,
                              GHESS_GELU_TANH_BODY(ghess_sigmoid_pair))
GHESS_DEFINE_ACTIVATION_BLOCK(double, ghess_elu_block,
                              GHESS_ELU_BODY(ghess_expm1_nonpositive, ghess_exp_nonpositive, -708))
GHESS_DEFINE_ACTIVATION_BLOCK(double, ghess_gelu_block, GHESS_GELU_BODY(ghess_normal_pair))
#undef T
#define T float
GHESS_DEFINE_ACTIVATION_BLOCK(float, ghess_sigmoidf_block,
                              GHESS_SIGMOID_BODY(ghess_sigmoidf_pair))
GHESS_DEFINE_ACTIVATION_BLOCK(float, ghess_siluf_block, GHESS_SILU_BODY(ghess_sigmoidf_pair))
GHESS_DEFINE_ACTIVATION_BLOCK(float, ghess_gelu_tanhf_block,
                              GHESS_GELU_TANH_BODY(ghess_sigmoidf_pair))
GHESS_DEFINE_ACTIVATION_BLOCK(float, ghess_eluf_block,
                              GHESS_ELU_BODY(ghess_expm1f_nonpositive, ghess_expf_nonpositive, -87))
GHESS_DEFINE_ACTIVATION_BLOCK(float, ghess_geluf_block, GHESS_GELU_BODY(ghess_normalf_pair))
#undef T

#endif
