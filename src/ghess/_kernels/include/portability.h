/* Compiler, CPU and OpenMP tests of the C kernels, in one place.
 *
 *   GHESS_ISA_GENERIC, GHESS_ISA_AVX2, GHESS_ISA_AVX512, ghess_cpu_isa()
 *                          the instruction-set levels, and the best this CPU runs
 *   GHESS_ISA_VARIANTS, GHESS_ISA_CALL, GHESS_ISA_SELECT, ghess_set_isa_level()
 *                          a kernel built once per level, and the call of the build
 *                          of the level in use (set at import: GHESS_ISA)
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

/* The instruction-set levels. */
#define GHESS_ISA_GENERIC 0
#define GHESS_ISA_AVX2 1
#define GHESS_ISA_AVX512 2

/* The best level this CPU runs: AVX-512 (x86-64-v4), AVX2 + FMA, or neither. */
static int ghess_cpu_isa(void)
{
#if GHESS_X86_INTRINSICS
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return GHESS_ISA_GENERIC;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return GHESS_ISA_AVX512;
    return GHESS_ISA_AVX2;
#else
    return GHESS_ISA_GENERIC;
#endif
}

/* Kernels written in plain C (contract.h, skinny.h, vecmath.h) are built once per level:
 * GHESS_ISA_VARIANTS(DEFINE, T, NAME, ...) expands DEFINE(T, NAME_vL, ..., ATTRIBUTE) for
 * the baseline (L = 0), AVX2 (1) and AVX-512 (2; x86-64 with GCC or clang only); C99
 * wants at least one argument in "...": a DEFINE that needs none takes an unused one. And
 * GHESS_ISA_CALL(NAME, (args)) calls the build of the level in use (GHESS_ISA_SELECT(NAME,
 * TAIL) is that build, NAME_vL TAIL, for a call whose result is wanted; GHESS_ISA_CALL_AT(level,
 * NAME, (args)) the build of a level at most the one in use). The level is one per
 * module (ghess_set_isa_level, from set_isa at import; the baseline until then), never
 * above ghess_cpu_isa(). No build contracts a * b + c into an FMA: the AVX2 target has no
 * FMA and the AVX-512 one is told not to, so elementwise kernels give the same bits at
 * every level (sums vectorised over lanes may round differently). */
static int ghess_isa_level = GHESS_ISA_GENERIC;

static int ghess_set_isa_level(int level)
{
    int cpu = ghess_cpu_isa();
    ghess_isa_level = level < GHESS_ISA_GENERIC ? GHESS_ISA_GENERIC : (level > cpu ? cpu : level);
    return ghess_isa_level;
}

#if GHESS_X86_INTRINSICS
#define GHESS_ATTR_AVX2 __attribute__((target("avx2")))
#if defined(__clang__) /* no optimize attribute: the pragma in GHESS_NO_CONTRACT instead */
#define GHESS_ATTR_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define GHESS_NO_CONTRACT _Pragma("clang fp contract(off)")
#else
#define GHESS_ATTR_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), optimize("fp-contract=off")))
#define GHESS_NO_CONTRACT
#endif
#define GHESS_ISA_VARIANTS(DEFINE, T, NAME, ...)                                          \
    DEFINE(T, NAME##_v0, __VA_ARGS__, )                                                   \
    DEFINE(T, NAME##_v1, __VA_ARGS__, GHESS_ATTR_AVX2)                                    \
    DEFINE(T, NAME##_v2, __VA_ARGS__, GHESS_ATTR_AVX512)
#define GHESS_ISA_SELECT(NAME, TAIL)                                                      \
    (ghess_isa_level >= GHESS_ISA_AVX512                                                  \
         ? NAME##_v2##TAIL                                                                \
         : ghess_isa_level == GHESS_ISA_AVX2 ? NAME##_v1##TAIL : NAME##_v0##TAIL)
#define GHESS_ISA_CALL_AT(LEVEL, NAME, ARGS)                                              \
    do {                                                                                  \
        if ((LEVEL) >= GHESS_ISA_AVX512)                                                  \
            NAME##_v2 ARGS;                                                               \
        else if ((LEVEL) == GHESS_ISA_AVX2)                                               \
            NAME##_v1 ARGS;                                                               \
        else                                                                              \
            NAME##_v0 ARGS;                                                               \
    } while (0)
#define GHESS_ISA_CALL(NAME, ARGS) GHESS_ISA_CALL_AT(ghess_isa_level, NAME, ARGS)
#else
#define GHESS_NO_CONTRACT
#define GHESS_ISA_VARIANTS(DEFINE, T, NAME, ...) DEFINE(T, NAME##_v0, __VA_ARGS__, )
#define GHESS_ISA_SELECT(NAME, TAIL) NAME##_v0##TAIL
#define GHESS_ISA_CALL_AT(LEVEL, NAME, ARGS) NAME##_v0 ARGS
#define GHESS_ISA_CALL(NAME, ARGS) NAME##_v0 ARGS
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
