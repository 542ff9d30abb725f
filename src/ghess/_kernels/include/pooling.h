/* Pooling, one sample at a time (conv.pyx spreads the samples over threads):
 *
 *   ghess_maxpool      y = each window's maximum (padding is -inf), argmax = the index in
 *                      the sample's input of the FIRST maximum in row-major window order
 *                      (strict '>', as PyTorch)
 *   ghess_gather       out[j, o] = gain[o] * x[j, index[o]]   (max pooling's JVP; gain NULL: 1)
 *   ghess_scatter      out[j, :] = 0, then out[j, index[o]] += gain[o] * g[j, o]   (its VJP)
 *   ghess_avgpool, ghess_avgpool_t
 *                      the mean over each window, padded zeros included (divisor kh * kw),
 *                      and its transpose
 *
 * Each is built once per ISA level (GHESS_ISA_VARIANTS) and called at the module's level.
 * The results are the same bits at every level: maxima and indices are exact, and the
 * sums (average pooling) run in one order in double, with no FMA contraction.
 *
 * Indices are int32: a sample's input has fewer than 2**31 elements (the layers check),
 * and half the bytes of a pointer-sized index are half the memory traffic of the JVP and
 * VJP, which do little else than follow them.
 */
#ifndef GHESS_POOLING_H
#define GHESS_POOLING_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "geometry.h"    /* ghess_dc_geom */
#include "portability.h" /* GHESS_ISA_VARIANTS, GHESS_ISA_CALL, GHESS_NO_CONTRACT, GHESS_SIMD */

/* best, bi = v, at if v > best (strict: the first maximum stays). In the scalar loops
 * (the tails of 2x2 rows, and other windows) the index is chosen by a mask, not a
 * conditional, which GCC turned into a branch there: after ReLU which element wins is
 * unpredictable, and the branches ran 4x slower than selects. */
#define GHESS_POOL_TAKE(v, at, best, bi)                                                  \
    do {                                                                                  \
        const int32_t take_ = -(int32_t)((v) > (best));                                   \
        (bi) = ((bi) & ~take_) | ((at) & take_);                                          \
        (best) = (v) > (best) ? (v) : (best);                                             \
    } while (0)

/* 2x2 windows at stride 2 without padding (the common case): one output row's windows
 * read two input rows, and the loop over them vectorises (the conditionals become vector
 * selects; ghess_maxpool sends rows with a long tail past whole AVX-512 vectors to the
 * AVX2 build). */
#define GHESS_DEFINE_MAXPOOL2(T, NAME, UNUSED, ATTR)                                      \
ATTR static void NAME(const T *restrict x, T *restrict y, int32_t *restrict argmax,       \
                      const ghess_dc_geom *g)                                             \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    const int H = g->H, W = g->W, oh = g->out_h, ow = g->out_w;                           \
    /* whole vectors of the widest ISA (64 bytes) in the selects' loop, the rest in the */ \
    /* masks' loop: the compiler's own scalar tail of the first branched              */ \
    const int whole = ow - ow % (64 / (int)sizeof(T));                                    \
    for (int c = 0; c < g->C; c++) {                                                      \
        for (int oi = 0; oi < oh; oi++) {                                                 \
            const int32_t base = (int32_t)((c * H + 2 * oi) * W);                         \
            const T *r0 = x + base, *r1 = r0 + W;                                         \
            T *yo = y + ((ptrdiff_t)c * oh + oi) * ow;                                    \
            int32_t *ao = argmax + ((ptrdiff_t)c * oh + oi) * ow;                         \
            GHESS_SIMD                                                                    \
            for (int oj = 0; oj < whole; oj++) {                                          \
                T best = r0[2 * oj];                                                      \
                int32_t at = base + 2 * oj, bi = at;                                      \
                T v = r0[2 * oj + 1];                                                     \
                bi = v > best ? at + 1 : bi;                                              \
                best = v > best ? v : best;                                               \
                v = r1[2 * oj];                                                           \
                bi = v > best ? at + W : bi;                                              \
                best = v > best ? v : best;                                               \
                v = r1[2 * oj + 1];                                                       \
                bi = v > best ? at + W + 1 : bi;                                          \
                best = v > best ? v : best;                                               \
                yo[oj] = best;                                                            \
                ao[oj] = bi;                                                              \
            }                                                                             \
            for (int oj = whole; oj < ow; oj++) {                                         \
                T best = r0[2 * oj];                                                      \
                int32_t at = base + 2 * oj, bi = at;                                      \
                GHESS_POOL_TAKE(r0[2 * oj + 1], at + 1, best, bi);                        \
                GHESS_POOL_TAKE(r1[2 * oj], at + W, best, bi);                            \
                GHESS_POOL_TAKE(r1[2 * oj + 1], at + W + 1, best, bi);                    \
                yo[oj] = best;                                                            \
                ao[oj] = bi;                                                              \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}

/* Any other window: inside the input (selects), or reaching into padding (bounds tests). */
#define GHESS_DEFINE_MAXPOOL(T, NAME, UNUSED, ATTR)                                       \
ATTR static void NAME(const T *restrict x, T *restrict y, int32_t *restrict argmax,       \
                      const ghess_dc_geom *g)                                             \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    const int H = g->H, W = g->W, oh = g->out_h, ow = g->out_w;                           \
    ptrdiff_t o = 0;                                                                      \
    if (g->ph == 0 && g->pw == 0) {                                                       \
        for (int c = 0; c < g->C; c++)                                                    \
            for (int oi = 0; oi < oh; oi++)                                               \
                for (int oj = 0; oj < ow; oj++, o++) {                                    \
                    const int32_t row = (int32_t)((c * H + oi * g->sh) * W + oj * g->sw); \
                    T best = x[row];                                                      \
                    int32_t bi = row;                                                     \
                    for (int a = 0; a < g->kh; a++)                                       \
                        for (int b = 0; b < g->kw; b++) {                                 \
                            const int32_t at = row + a * g->dh * W + b * g->dw;           \
                            GHESS_POOL_TAKE(x[at], at, best, bi);                         \
                        }                                                                 \
                    y[o] = best;                                                          \
                    argmax[o] = bi;                                                       \
                }                                                                         \
        return;                                                                           \
    }                                                                                     \
    for (int c = 0; c < g->C; c++)                                                        \
        for (int oi = 0; oi < oh; oi++)                                                   \
            for (int oj = 0; oj < ow; oj++, o++) {                                        \
                int found = 0;                                                            \
                T best = 0;                                                               \
                int32_t bi = 0;                                                           \
                for (int a = 0; a < g->kh; a++) {                                         \
                    const int ih = oi * g->sh - g->ph + a * g->dh;                        \
                    if (ih < 0 || ih >= H)                                                \
                        continue;                                                         \
                    for (int b = 0; b < g->kw; b++) {                                     \
                        const int iw = oj * g->sw - g->pw + b * g->dw;                    \
                        if (iw < 0 || iw >= W)                                            \
                            continue;                                                     \
                        const int32_t at = (int32_t)((c * H + ih) * W + iw);              \
                        if (!found || x[at] > best) {                                     \
                            found = 1;                                                    \
                            best = x[at];                                                 \
                            bi = at;                                                      \
                        }                                                                 \
                    }                                                                     \
                }                                                                         \
                y[o] = best;                                                              \
                argmax[o] = bi;                                                           \
            }                                                                             \
}

/* k rows of x (each in_width long) read at m indices, times the gain where given */
#define GHESS_DEFINE_GATHER(T, NAME, UNUSED, ATTR)                                        \
ATTR static void NAME(const T *restrict x, ptrdiff_t in_width, const int32_t *restrict index, \
                      const T *restrict gain, T *restrict out, ptrdiff_t m, ptrdiff_t k)  \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    for (ptrdiff_t j = 0; j < k; j++) {                                                   \
        const T *xj = x + j * in_width;                                                   \
        T *oj = out + j * m;                                                              \
        if (gain) {                                                                       \
            GHESS_SIMD                                                                    \
            for (ptrdiff_t o = 0; o < m; o++)                                             \
                oj[o] = gain[o] * xj[index[o]];                                           \
        } else {                                                                          \
            GHESS_SIMD                                                                    \
            for (ptrdiff_t o = 0; o < m; o++)                                             \
                oj[o] = xj[index[o]];                                                     \
        }                                                                                 \
    }                                                                                     \
}

/* the transpose of the gather: k rows of out (in_width long) zeroed, then added into.
 * distinct: no index repeats (windows that do not overlap), so each output is written
 * at most once and the loop has no dependence between iterations (it vectorises where
 * the ISA scatters). */
#define GHESS_DEFINE_SCATTER(T, NAME, UNUSED, ATTR)                                       \
ATTR static void NAME(const T *restrict g, ptrdiff_t m, const int32_t *restrict index,    \
                      const T *restrict gain, T *restrict out, ptrdiff_t in_width,        \
                      ptrdiff_t k, int distinct)                                          \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    for (ptrdiff_t j = 0; j < k; j++) {                                                   \
        const T *gj = g + j * m;                                                          \
        T *oj = out + j * in_width;                                                       \
        memset(oj, 0, sizeof(T) * (size_t)in_width);                                      \
        if (distinct && gain) {                                                           \
            GHESS_SIMD                                                                    \
            for (ptrdiff_t o = 0; o < m; o++)                                             \
                oj[index[o]] = gain[o] * gj[o];                                           \
        } else if (distinct) {                                                            \
            GHESS_SIMD                                                                    \
            for (ptrdiff_t o = 0; o < m; o++)                                             \
                oj[index[o]] = gj[o];                                                     \
        } else {                                                                          \
            for (ptrdiff_t o = 0; o < m; o++)                                             \
                oj[index[o]] += gain ? gain[o] * gj[o] : gj[o];                           \
        }                                                                                 \
    }                                                                                     \
}

/* The taps [lo, hi) of a window starting at `start` (step d, k taps) that fall inside
 * [0, size): the loops over a window then run without a bounds test per tap. */
static inline void ghess_window_taps(int start, int k, int d, int size, int *lo, int *hi)
{
    int a = 0, b = k;
    while (a < k && start + a * d < 0)
        a++;
    while (b > a && start + (b - 1) * d >= size)
        b--;
    *lo = a;
    *hi = b;
}

/* Every window of one sample, output o at (c, oi, oj) in order, with its taps inside the
 * input: rows a0 <= a < a1 from row i0, columns b0 <= b < b1 from column j0 (steps dh, dw);
 * the statement (the variadic argument) runs once per window. */
#define GHESS_POOL_WINDOWS(g, ...)                                                        \
    do {                                                                                  \
        ptrdiff_t o = 0;                                                                  \
        for (int c = 0; c < (g)->C; c++)                                                  \
            for (int oi = 0; oi < (g)->out_h; oi++) {                                     \
                const int i0 = oi * (g)->sh - (g)->ph;                                    \
                int a0, a1;                                                               \
                ghess_window_taps(i0, (g)->kh, (g)->dh, (g)->H, &a0, &a1);                \
                for (int oj = 0; oj < (g)->out_w; oj++, o++) {                            \
                    const int j0 = oj * (g)->sw - (g)->pw;                                \
                    int b0, b1;                                                           \
                    ghess_window_taps(j0, (g)->kw, (g)->dw, (g)->W, &b0, &b1);            \
                    __VA_ARGS__                                                           \
                }                                                                         \
            }                                                                             \
    } while (0)

/* average pooling (the window's sum in double, in row-major order, times 1/(kh kw)) */
#define GHESS_DEFINE_AVGPOOL(T, NAME, UNUSED, ATTR)                                       \
ATTR static void NAME(const T *restrict x, T *restrict y, const ghess_dc_geom *g)         \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    const double inv = 1.0 / (g->kh * g->kw);                                             \
    GHESS_POOL_WINDOWS(g, {                                                               \
        double acc = 0.0;                                                                 \
        for (int a = a0; a < a1; a++) {                                                   \
            const T *xr = x + ((ptrdiff_t)c * g->H + i0 + a * g->dh) * g->W + j0;         \
            for (int b = b0; b < b1; b++)                                                 \
                acc += xr[b * g->dw];                                                     \
        }                                                                                 \
        y[o] = (T)(acc * inv);                                                            \
    });                                                                                   \
}

/* its transpose: gx zeroed, then each output's gradient over kh kw spread on its window */
#define GHESS_DEFINE_AVGPOOL_T(T, NAME, UNUSED, ATTR)                                     \
ATTR static void NAME(const T *restrict gy, T *restrict gx, const ghess_dc_geom *g)       \
{                                                                                         \
    GHESS_NO_CONTRACT                                                                     \
    const double inv = 1.0 / (g->kh * g->kw);                                             \
    memset(gx, 0, sizeof(T) * (size_t)g->C * g->H * g->W);                                \
    GHESS_POOL_WINDOWS(g, {                                                               \
        const T share = (T)(gy[o] * inv);                                                 \
        for (int a = a0; a < a1; a++) {                                                   \
            T *gr = gx + ((ptrdiff_t)c * g->H + i0 + a * g->dh) * g->W + j0;              \
            for (int b = b0; b < b1; b++)                                                 \
                gr[b * g->dw] += share;                                                   \
        }                                                                                 \
    });                                                                                   \
}

/* every level's builds, and the functions that call the one in use */
#define GHESS_DEFINE_POOLING(T, SUFFIX)                                                   \
GHESS_ISA_VARIANTS(GHESS_DEFINE_MAXPOOL2, T, ghess_maxpool2_##SUFFIX, 0)                  \
GHESS_ISA_VARIANTS(GHESS_DEFINE_MAXPOOL, T, ghess_maxpool_##SUFFIX, 0)                    \
GHESS_ISA_VARIANTS(GHESS_DEFINE_GATHER, T, ghess_gather_##SUFFIX, 0)                      \
GHESS_ISA_VARIANTS(GHESS_DEFINE_SCATTER, T, ghess_scatter_##SUFFIX, 0)                    \
GHESS_ISA_VARIANTS(GHESS_DEFINE_AVGPOOL, T, ghess_avgpool_##SUFFIX, 0)                    \
GHESS_ISA_VARIANTS(GHESS_DEFINE_AVGPOOL_T, T, ghess_avgpool_t_##SUFFIX, 0)                \
static void ghess_maxpool_##SUFFIX(const T *x, T *y, int32_t *argmax,                     \
                                   const ghess_dc_geom *g)                                \
{                                                                                         \
    if (!(g->kh == 2 && g->kw == 2 && g->sh == 2 && g->sw == 2 && g->dh == 1 &&           \
          g->dw == 1 && g->ph == 0 && g->pw == 0)) {                                      \
        GHESS_ISA_CALL(ghess_maxpool_##SUFFIX, (x, y, argmax, g));                        \
        return;                                                                           \
    }                                                                                     \
    /* rows whose tail past whole AVX-512 vectors is over a quarter of the row go to  */ \
    /* the AVX2 build, whose vectors cover them better (rows of 4 floats: 0.25 ms     */ \
    /* against 3.4 when the AVX-512 build's tails branched; 14 doubles: 0.48 vs 0.67) */ \
    int level = ghess_isa_level;                                                          \
    if (level == GHESS_ISA_AVX512 && 4 * (g->out_w % (64 / (int)sizeof(T))) > g->out_w)  \
        level = GHESS_ISA_AVX2;                                                           \
    GHESS_ISA_CALL_AT(level, ghess_maxpool2_##SUFFIX, (x, y, argmax, g));                 \
}                                                                                         \
static void ghess_gather_##SUFFIX(const T *x, ptrdiff_t in_width, const int32_t *index,   \
                                  const T *gain, T *out, ptrdiff_t m, ptrdiff_t k)        \
{                                                                                         \
    GHESS_ISA_CALL(ghess_gather_##SUFFIX, (x, in_width, index, gain, out, m, k));         \
}                                                                                         \
static void ghess_scatter_##SUFFIX(const T *g, ptrdiff_t m, const int32_t *index,         \
                                   const T *gain, T *out, ptrdiff_t in_width, ptrdiff_t k, \
                                   int distinct)                                          \
{                                                                                         \
    GHESS_ISA_CALL(ghess_scatter_##SUFFIX, (g, m, index, gain, out, in_width, k,          \
                                            distinct));                                   \
}                                                                                         \
static void ghess_avgpool_##SUFFIX(const T *x, T *y, const ghess_dc_geom *g)              \
{                                                                                         \
    GHESS_ISA_CALL(ghess_avgpool_##SUFFIX, (x, y, g));                                    \
}                                                                                         \
static void ghess_avgpool_t_##SUFFIX(const T *gy, T *gx, const ghess_dc_geom *g)          \
{                                                                                         \
    GHESS_ISA_CALL(ghess_avgpool_t_##SUFFIX, (gy, gx, g));                                \
}

GHESS_DEFINE_POOLING(double, f64)
GHESS_DEFINE_POOLING(float, f32)

#endif
