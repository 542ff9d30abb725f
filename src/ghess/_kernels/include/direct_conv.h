/* Direct convolution for stride-1 (in width) layers, AVX-512 or AVX2 + FMA.
 *
 *   out[m, p] = sum_k W[m, k] x_pad[off[k] + base(p)]  (+ bias[m])
 *
 * with k = (c, a, b) over C * kh * kw, p = (i, j) over the output positions,
 * off[k] = (c * Hp + a * dh) * Wp + b * dw and base(p) = i * sh * Wp + j in the
 * zero-padded input x_pad (C, Hp, Wp). Along an output row, stride 1 makes the
 * unfolded row k a CONTIGUOUS run of x_pad, so the GEMM's B operand is loaded
 * straight from the (cache-resident) padded input: no im2col buffer is written
 * and read back. Register tile: 6 output channels x 2 vectors of positions (16
 * floats or 8 doubles), 12 accumulators, W packed as 6-channel panels. On the
 * layers of small convolutional nets this is about twice as fast as im2col +
 * per-sample BLAS GEMMs, which write the unfolded input and read it back.
 *
 * A vector of positions must lie within one output row: rows are cut into runs
 * of at most one vector; a run shorter than a vector computes its lanes from
 * whatever follows in x_pad (SLACK elements are allocated past the end for the
 * last row) and stores only its own. Available on x86-64 with GCC or Clang,
 * checked at run time (ghess_cpu_isa); elsewhere ghess uses the im2col path.
 *
 * Two builds of each kernel, chosen per call by the caller (conv.pyx: the level set, or
 * per layer the faster of the two, timed at its first call): AVX-512
 * (vectors of 16 floats / 8 doubles) and AVX2 + FMA (8 / 4). Every lane runs the same
 * sequence of FMAs in both (a lane is one output position in the forward kernel, one
 * output channel in the weight gradient, and the sums over k or p run in the same
 * order), so the two give the same bits.
 */
#ifndef GHESS_DIRECT_CONV_H
#define GHESS_DIRECT_CONV_H

#include <stddef.h>
#include <string.h>

#include "geometry.h"    /* ghess_dc_geom */
#include "portability.h" /* GHESS_X86_INTRINSICS, GHESS_TARGET_*, GHESS_ISA_*, ghess_cpu_isa */

#define GHESS_DC_MR 6
/* elements readable past the end of a padded input (one vector's overrun: 16 floats) */
#define GHESS_DC_SLACK 16

#if GHESS_X86_INTRINSICS
#include <immintrin.h>
#endif

/* The vector length (elements) of the kernels at an ISA level, for doubles or floats. */
static int ghess_dc_vector_length(int isa, int is_double)
{
    return (isa == GHESS_ISA_AVX512 ? 16 : 8) / (is_double ? 2 : 1);
}


static ptrdiff_t ghess_dc_padded_size(const ghess_dc_geom *g)
{
    return (ptrdiff_t)g->C * (g->H + 2 * g->ph) * (g->W + 2 * g->pw) + GHESS_DC_SLACK;
}

static void ghess_dc_offsets(const ghess_dc_geom *g, int *off)
{
    int Hp = g->H + 2 * g->ph, Wp = g->W + 2 * g->pw, k = 0;
    for (int c = 0; c < g->C; c++)
        for (int a = 0; a < g->kh; a++)
            for (int b = 0; b < g->kw; b++)
                off[k++] = (c * Hp + a * g->dh) * Wp + b * g->dw;
}

#define GHESS_DEFINE_DIRECT_CONV(T, SUFFIX)                                                 \
/* Ap[panel][k][r] = W[6 * panel + r, k], zero rows past M */                               \
static void ghess_dc_pack_weights_##SUFFIX(const T *w, int M, int K, T *Ap)                 \
{                                                                                           \
    for (int ib = 0; ib < M; ib += GHESS_DC_MR) {                                           \
        T *panel = Ap + (ptrdiff_t)ib * K;                                                  \
        int mr = M - ib < GHESS_DC_MR ? M - ib : GHESS_DC_MR;                               \
        for (int k = 0; k < K; k++) {                                                       \
            for (int r = 0; r < mr; r++)                                                    \
                panel[k * GHESS_DC_MR + r] = w[(ptrdiff_t)(ib + r) * K + k];                \
            for (int r = mr; r < GHESS_DC_MR; r++)                                          \
                panel[k * GHESS_DC_MR + r] = 0;                                             \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* x_pad = x with ph rows and pw columns of zeros around each channel, then slack */        \
static void ghess_dc_pad_##SUFFIX(const T *x, const ghess_dc_geom *g, T *xp)                \
{                                                                                           \
    int Hp = g->H + 2 * g->ph, Wp = g->W + 2 * g->pw;                                       \
    memset(xp, 0, sizeof(T) * (size_t)ghess_dc_padded_size(g));                             \
    for (int c = 0; c < g->C; c++)                                                          \
        for (int i = 0; i < g->H; i++)                                                      \
            memcpy(xp + ((ptrdiff_t)c * Hp + i + g->ph) * Wp + g->pw,                       \
                   x + ((ptrdiff_t)c * g->H + i) * g->W, sizeof(T) * (size_t)g->W);         \
}

#define GHESS_DC_PACK_BLOCK 64
#define GHESS_DEFINE_DIRECT_WGRAD_PACK(T, SUFFIX, L)                                        \
/* gT[panel][p][j] = g[2L * panel + j, p]: output gradients (M, P) transposed into panels   \
 * of two vectors of channels, zero past M. In blocks of GHESS_DC_PACK_BLOCK positions, so  \
 * the block of the panel that every channel writes into stays in L1 (a whole panel of a    \
 * 28x28 layer is 50 KB, and each of its cache lines is written once per channel) */        \
static void ghess_dc_pack_grad_##SUFFIX(const T *g, int M, int P, T *gT)                    \
{                                                                                           \
    for (int m0 = 0; m0 < M; m0 += 2 * L) {                                                 \
        T *panel = gT + (ptrdiff_t)m0 * P;                                                  \
        int w = M - m0 < 2 * L ? M - m0 : 2 * L;                                            \
        for (int p0 = 0; p0 < P; p0 += GHESS_DC_PACK_BLOCK) {                               \
            int p1 = P - p0 < GHESS_DC_PACK_BLOCK ? P : p0 + GHESS_DC_PACK_BLOCK;           \
            for (int j = 0; j < w; j++) {                                                   \
                const T *src = g + (ptrdiff_t)(m0 + j) * P;                                 \
                for (int p = p0; p < p1; p++)                                               \
                    panel[(ptrdiff_t)p * 2 * L + j] = src[p];                               \
            }                                                                               \
            for (int j = w; j < 2 * L; j++)                                                 \
                for (int p = p0; p < p1; p++)                                               \
                    panel[(ptrdiff_t)p * 2 * L + j] = 0;                                    \
        }                                                                                   \
    }                                                                                       \
}

GHESS_DEFINE_DIRECT_CONV(double, f64)
GHESS_DEFINE_DIRECT_CONV(float, f32)
GHESS_DEFINE_DIRECT_WGRAD_PACK(double, f64_l4, 4)
GHESS_DEFINE_DIRECT_WGRAD_PACK(float, f32_l8, 8)
GHESS_DEFINE_DIRECT_WGRAD_PACK(double, f64_l8, 8)
GHESS_DEFINE_DIRECT_WGRAD_PACK(float, f32_l16, 16)

/* the gradient panels for vectors of L elements (ghess_dc_vector_length) */
static void ghess_dc_pack_grad_f64(int L, const double *g, int M, int P, double *gT)
{
    if (L == 8)
        ghess_dc_pack_grad_f64_l8(g, M, P, gT);
    else
        ghess_dc_pack_grad_f64_l4(g, M, P, gT);
}

static void ghess_dc_pack_grad_f32(int L, const float *g, int M, int P, float *gT)
{
    if (L == 16)
        ghess_dc_pack_grad_f32_l16(g, M, P, gT);
    else
        ghess_dc_pack_grad_f32_l8(g, M, P, gT);
}

/* elements of the transposed-gradient panels for M channels and P positions */
static ptrdiff_t ghess_dc_grad_panels_size(int M, int P, int vector_length)
{
    return (ptrdiff_t)((M + 2 * vector_length - 1) / (2 * vector_length)) * 2 * vector_length * P;
}

#if GHESS_X86_INTRINSICS
/* The 6 x 2-vector register tile both kernels share: 12 named accumulators (named, not
 * an array, so that they stay in registers), a rank-1 update with b0 and b1 (in scope)
 * by the six scalars at p0..p5, and the accumulators gathered for the stores. */
#define GHESS_DC_ACC_ZERO(VEC, SETZERO)                                                     \
    VEC c00 = SETZERO(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;             \
    VEC c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define GHESS_DC_ACC_UPDATE(VEC, BCAST, FMA, p0, p1, p2, p3, p4, p5)                        \
    {                                                                                       \
        VEC a0 = BCAST(p0), a1 = BCAST(p1);                                                 \
        c00 = FMA(a0, b0, c00); c01 = FMA(a0, b1, c01);                                     \
        c10 = FMA(a1, b0, c10); c11 = FMA(a1, b1, c11);                                     \
        a0 = BCAST(p2); a1 = BCAST(p3);                                                     \
        c20 = FMA(a0, b0, c20); c21 = FMA(a0, b1, c21);                                     \
        c30 = FMA(a1, b0, c30); c31 = FMA(a1, b1, c31);                                     \
        a0 = BCAST(p4); a1 = BCAST(p5);                                                     \
        c40 = FMA(a0, b0, c40); c41 = FMA(a0, b1, c41);                                     \
        c50 = FMA(a1, b0, c50); c51 = FMA(a1, b1, c51);                                     \
    }
#define GHESS_DC_ACC_ARRAY(VEC)                                                             \
    VEC acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};

/* One tile: rows ib..ib+mr of out, the positions of two runs (each at most one vector)
 * starting at out + p0 / out + p1, read from xp + x0 / xp + x1. */
#define GHESS_DC_TILE(T, VEC, LOADU, BCAST, FMA, SETZERO, STOREU, ADD, L)                        \
    GHESS_DC_ACC_ZERO(VEC, SETZERO)                                                         \
    for (int k = 0; k < K; k++) {                                                           \
        ptrdiff_t o = off[k];                                                               \
        VEC b0 = LOADU(in0 + o), b1 = LOADU(in1 + o);                                       \
        GHESS_DC_ACC_UPDATE(VEC, BCAST, FMA, a, a + 1, a + 2, a + 3, a + 4, a + 5)          \
        a += GHESS_DC_MR;                                                                   \
    }                                                                                       \
    GHESS_DC_ACC_ARRAY(VEC)                                                                 \
    for (int r = 0; r < mr; r++) {                                                          \
        T *row = out + (ptrdiff_t)(ib + r) * P;                                             \
        VEC shift = bias ? BCAST(bias + ib + r) : SETZERO();                                \
        VEC v0 = ADD(acc[2 * r], shift), v1 = ADD(acc[2 * r + 1], shift);                   \
        if (len0 == L && len1 == L) {                                                       \
            if (accumulate) {                                                               \
                v0 = ADD(LOADU(row + p0), v0);                                              \
                v1 = ADD(LOADU(row + p1), v1);                                              \
            }                                                                               \
            STOREU(row + p0, v0);                                                           \
            STOREU(row + p1, v1);                                                           \
        } else {                                                                            \
            T lanes[2 * L];                                                                 \
            STOREU(lanes, v0);                                                              \
            STOREU(lanes + L, v1);                                                          \
            for (int j = 0; j < len0; j++)                                                  \
                row[p0 + j] = accumulate ? row[p0 + j] + lanes[j] : lanes[j];               \
            for (int j = 0; j < len1; j++)                                                  \
                row[p1 + j] = accumulate ? row[p1 + j] + lanes[L + j] : lanes[L + j];       \
        }                                                                                   \
    }

#define GHESS_DEFINE_DIRECT_CONV_X86(TARGET, T, SUFFIX, VEC, LOADU, BCAST, FMA, SETZERO, STOREU, ADD, L) \
/* out (M, P) (+)= W x (+ bias) for one sample; Ap from ghess_dc_pack_weights, xp from     \
 * ghess_dc_pad, off from ghess_dc_offsets. sw must be 1. */                                \
TARGET                                                                                      \
static void ghess_dc_forward_##SUFFIX(const T *Ap, const T *bias, int M, const T *xp,       \
                                      const int *off, const ghess_dc_geom *g, T *out,       \
                                      int accumulate)                                       \
{                                                                                           \
    const int K = g->C * g->kh * g->kw, P = g->out_h * g->out_w;                            \
    const int Wp = g->W + 2 * g->pw, runs_per_row = (g->out_w + L - 1) / L;                 \
    const int n_runs = g->out_h * runs_per_row;                                             \
    for (int t = 0; t < n_runs; t += 2) {                                                   \
        int i0 = t / runs_per_row, j0 = (t % runs_per_row) * L;                             \
        int len0 = g->out_w - j0 < L ? g->out_w - j0 : L, p0 = i0 * g->out_w + j0;          \
        int i1 = i0, j1 = j0, len1 = 0, p1 = p0;                                            \
        if (t + 1 < n_runs) {                                                               \
            i1 = (t + 1) / runs_per_row; j1 = ((t + 1) % runs_per_row) * L;                 \
            len1 = g->out_w - j1 < L ? g->out_w - j1 : L; p1 = i1 * g->out_w + j1;          \
        }                                                                                   \
        const T *in0 = xp + (ptrdiff_t)i0 * g->sh * Wp + j0;                                \
        const T *in1 = xp + (ptrdiff_t)i1 * g->sh * Wp + j1;                                \
        for (int ib = 0; ib < M; ib += GHESS_DC_MR) {                                       \
            const T *a = Ap + (ptrdiff_t)ib * K;                                            \
            int mr = M - ib < GHESS_DC_MR ? M - ib : GHESS_DC_MR;                           \
            GHESS_DC_TILE(T, VEC, LOADU, BCAST, FMA, SETZERO, STOREU, ADD, L)               \
        }                                                                                   \
    }                                                                                       \
}

/* work (K, M) += phi(x) g^T for one sample, i.e. the weight gradient, transposed:
 * work[k, m] += sum_p x_pad[off[k] + base(p)] g[m, p]. Tile: 6 taps k (broadcast from
 * x_pad, six pointers moving along an output row) x 2 vectors of channels (gT). */
#define GHESS_DEFINE_DIRECT_WGRAD_X86(TARGET, T, SUFFIX, VEC, LOADU, BCAST, FMA, SETZERO, STOREU, ADD, L) \
TARGET                                                                                      \
static void ghess_dc_weight_grad_##SUFFIX(const T *gT, int M, const T *xp, const int *off,  \
                                          const ghess_dc_geom *g, T *work)                  \
{                                                                                           \
    const int K = g->C * g->kh * g->kw, P = g->out_h * g->out_w, Wp = g->W + 2 * g->pw;     \
    for (int kb = 0; kb < K; kb += GHESS_DC_MR) {                                           \
        int kr = K - kb < GHESS_DC_MR ? K - kb : GHESS_DC_MR;                               \
        ptrdiff_t o[GHESS_DC_MR];                                                           \
        for (int r = 0; r < GHESS_DC_MR; r++)                                               \
            o[r] = off[kb + (r < kr ? r : 0)];  /* spare rows repeat a tap, not stored */   \
        for (int m0 = 0; m0 < M; m0 += 2 * L) {                                             \
            const T *b = gT + (ptrdiff_t)m0 * P;                                            \
            GHESS_DC_ACC_ZERO(VEC, SETZERO)                                                 \
            for (int i = 0; i < g->out_h; i++) {                                            \
                const T *row = xp + (ptrdiff_t)i * g->sh * Wp;                              \
                const T *x0 = row + o[0], *x1 = row + o[1], *x2 = row + o[2];               \
                const T *x3 = row + o[3], *x4 = row + o[4], *x5 = row + o[5];               \
                for (int j = 0; j < g->out_w; j++) {                                        \
                    VEC b0 = LOADU(b), b1 = LOADU(b + L);                                   \
                    GHESS_DC_ACC_UPDATE(VEC, BCAST, FMA, x0 + j, x1 + j, x2 + j, x3 + j,    \
                                        x4 + j, x5 + j)                                     \
                    b += 2 * L;                                                             \
                }                                                                           \
            }                                                                               \
            GHESS_DC_ACC_ARRAY(VEC)                                                         \
            int w = M - m0 < 2 * L ? M - m0 : 2 * L;                                        \
            for (int r = 0; r < kr; r++) {                                                  \
                T *dst = work + (ptrdiff_t)(kb + r) * M + m0;                               \
                if (w == 2 * L) {                                                           \
                    STOREU(dst, ADD(LOADU(dst), acc[2 * r]));                               \
                    STOREU(dst + L, ADD(LOADU(dst + L), acc[2 * r + 1]));                   \
                } else {                                                                    \
                    T lanes[2 * L];                                                         \
                    STOREU(lanes, acc[2 * r]);                                              \
                    STOREU(lanes + L, acc[2 * r + 1]);                                      \
                    for (int j = 0; j < w; j++)                                             \
                        dst[j] += lanes[j];                                                 \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}

/* Both kernels (forward and weight gradient) for one ISA and element type */
#define GHESS_DEFINE_DIRECT_X86(TARGET, T, SUFFIX, VEC, LOADU, BCAST, FMA, SETZERO, STOREU, ADD, L) \
    GHESS_DEFINE_DIRECT_WGRAD_X86(TARGET, T, SUFFIX, VEC, LOADU, BCAST, FMA, SETZERO, STOREU,  \
                                  ADD, L)                                                     \
    GHESS_DEFINE_DIRECT_CONV_X86(TARGET, T, SUFFIX, VEC, LOADU, BCAST, FMA, SETZERO, STOREU,   \
                                 ADD, L)

GHESS_DEFINE_DIRECT_X86(GHESS_TARGET_AVX2_FMA, double, avx2_f64, __m256d, _mm256_loadu_pd,
                        _mm256_broadcast_sd, _mm256_fmadd_pd, _mm256_setzero_pd,
                        _mm256_storeu_pd, _mm256_add_pd, 4)
GHESS_DEFINE_DIRECT_X86(GHESS_TARGET_AVX2_FMA, float, avx2_f32, __m256, _mm256_loadu_ps,
                        _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_setzero_ps,
                        _mm256_storeu_ps, _mm256_add_ps, 8)

/* AVX-512: a broadcast from memory is a set1 of the loaded scalar */
#define GHESS_BCAST512_PD(p) _mm512_set1_pd(*(p))
#define GHESS_BCAST512_PS(p) _mm512_set1_ps(*(p))
GHESS_DEFINE_DIRECT_X86(GHESS_TARGET_AVX512, double, avx512_f64, __m512d, _mm512_loadu_pd,
                        GHESS_BCAST512_PD, _mm512_fmadd_pd, _mm512_setzero_pd,
                        _mm512_storeu_pd, _mm512_add_pd, 8)
GHESS_DEFINE_DIRECT_X86(GHESS_TARGET_AVX512, float, avx512_f32, __m512, _mm512_loadu_ps,
                        GHESS_BCAST512_PS, _mm512_fmadd_ps, _mm512_setzero_ps,
                        _mm512_storeu_ps, _mm512_add_ps, 16)

/* The kernels of an ISA level (GHESS_ISA_AVX512, else AVX2; never called at GENERIC). */
#define GHESS_DEFINE_DIRECT_DISPATCH(T, SUFFIX)                                              \
static void ghess_dc_forward_##SUFFIX(int isa, const T *Ap, const T *bias, int M,           \
                                      const T *xp, const int *off, const ghess_dc_geom *g,  \
                                      T *out, int accumulate)                               \
{                                                                                           \
    if (isa == GHESS_ISA_AVX512)                                                            \
        ghess_dc_forward_avx512_##SUFFIX(Ap, bias, M, xp, off, g, out, accumulate);         \
    else                                                                                    \
        ghess_dc_forward_avx2_##SUFFIX(Ap, bias, M, xp, off, g, out, accumulate);           \
}                                                                                           \
                                                                                            \
static void ghess_dc_weight_grad_##SUFFIX(int isa, const T *gT, int M, const T *xp,         \
                                          const int *off, const ghess_dc_geom *g, T *work)  \
{                                                                                           \
    if (isa == GHESS_ISA_AVX512)                                                            \
        ghess_dc_weight_grad_avx512_##SUFFIX(gT, M, xp, off, g, work);                      \
    else                                                                                    \
        ghess_dc_weight_grad_avx2_##SUFFIX(gT, M, xp, off, g, work);                        \
}

GHESS_DEFINE_DIRECT_DISPATCH(double, f64)
GHESS_DEFINE_DIRECT_DISPATCH(float, f32)

#else
/* never called: ghess_cpu_isa() is GHESS_ISA_GENERIC */
static void ghess_dc_forward_f64(int isa, const double *Ap, const double *bias, int M,
                                 const double *xp, const int *off, const ghess_dc_geom *g,
                                 double *out, int accumulate)
{ (void)isa; (void)Ap; (void)bias; (void)M; (void)xp; (void)off; (void)g; (void)out;
  (void)accumulate; }
static void ghess_dc_forward_f32(int isa, const float *Ap, const float *bias, int M,
                                 const float *xp, const int *off, const ghess_dc_geom *g,
                                 float *out, int accumulate)
{ (void)isa; (void)Ap; (void)bias; (void)M; (void)xp; (void)off; (void)g; (void)out;
  (void)accumulate; }
static void ghess_dc_weight_grad_f64(int isa, const double *gT, int M, const double *xp,
                                     const int *off, const ghess_dc_geom *g, double *work)
{ (void)isa; (void)gT; (void)M; (void)xp; (void)off; (void)g; (void)work; }
static void ghess_dc_weight_grad_f32(int isa, const float *gT, int M, const float *xp,
                                     const int *off, const ghess_dc_geom *g, float *work)
{ (void)isa; (void)gT; (void)M; (void)xp; (void)off; (void)g; (void)work; }
#endif

#endif
