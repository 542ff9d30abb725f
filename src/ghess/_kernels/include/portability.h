/* Compiler, CPU and OpenMP tests of the C kernels, in one place.
 *
 *   GHESS_CLONES           before a function: an AVX2 clone beside the baseline one
 *   GHESS_X86_INTRINSICS   1 where <immintrin.h> and GHESS_TARGET_AVX2_FMA are usable
 *   GHESS_TARGET_AVX2_FMA  before a function: compile it for AVX2 + FMA
 *   GHESS_TARGET_AVX512    before a function: compile it for AVX-512 (F, BW, DQ, VL)
 *   GHESS_SIMD, GHESS_SIMD_SUM1, GHESS_SIMD_SUM4
 *                          before a loop: `omp simd`, with a + reduction over s0
 *                          (or s0..s3); nothing without OpenMP
 *   GHESS_OPENMP, ghess_omp_max_threads()
 *                          whether the kernels were built with OpenMP, and its
 *                          default number of threads (1 without)
 */
#ifndef GHESS_PORTABILITY_H
#define GHESS_PORTABILITY_H

#include <stdlib.h> /* on glibc, defines __GLIBC__ (tested below) through <features.h> */

/* Function multiversioning: the compiler builds an AVX2 clone beside the baseline (SSE2)
 * one and the dynamic loader picks one at load time. That goes through an ifunc, which
 * only glibc provides, and clang supports target_clones from version 14. FMA is left out,
 * so that elementwise code (vecmath.h's tanh) rounds alike in both clones. */
#if defined(__x86_64__) && defined(__GLIBC__) && \
    ((defined(__GNUC__) && !defined(__clang__)) || (defined(__clang__) && __clang_major__ >= 14))
#define GHESS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GHESS_CLONES
#endif

/* Intrinsics for kernels written for AVX2 + FMA explicitly (direct_conv.h). They are
 * compiled for those instructions whatever the baseline, so callers must check the CPU
 * at run time (__builtin_cpu_supports) before calling them. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GHESS_X86_INTRINSICS 1
#define GHESS_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
/* x86-64-v4: what AVX-512 servers (Skylake-SP and later, Zen 4 and later) all have */
#define GHESS_TARGET_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#else
#define GHESS_X86_INTRINSICS 0
#define GHESS_TARGET_AVX2_FMA
#define GHESS_TARGET_AVX512
#endif

/* `omp simd` lets the compiler vectorise loops it would otherwise keep in order, the
 * reductions in particular (it may then reassociate the sums into vector lanes). */
#if defined(_OPENMP)
#define GHESS_SIMD_SUM4 _Pragma("omp simd reduction(+:s0, s1, s2, s3)")
#define GHESS_SIMD_SUM1 _Pragma("omp simd reduction(+:s0)")
#define GHESS_SIMD _Pragma("omp simd")
#else
#define GHESS_SIMD_SUM4
#define GHESS_SIMD_SUM1
#define GHESS_SIMD
#endif

#ifdef _OPENMP
#include <omp.h>
#define GHESS_OPENMP 1
static int ghess_omp_max_threads(void) { return omp_get_max_threads(); }
#else
#define GHESS_OPENMP 0
static int ghess_omp_max_threads(void) { return 1; }
#endif

#endif
