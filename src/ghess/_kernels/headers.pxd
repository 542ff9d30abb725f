# The C kernels of include/ as dense.pyx and conv.pyx cimport them: one declaration of each.
# (alloc.h is alloc.pyx's alone: it needs NumPy's headers first, see alloc.pyx.)
# Every header listed here is #included by every module that cimports this file; the
# static functions a module does not call are not compiled into it.

from libc.stdint cimport int32_t


cdef extern from "portability.h":
    int GHESS_OPENMP  # 1 when built with OpenMP
    int ghess_omp_max_threads() nogil  # OpenMP's default number of threads, 1 without
    int ghess_cpu_isa()  # the best ISA level this CPU runs (0 baseline, 1 AVX2, 2 AVX-512)
    int ghess_set_isa_level(int level)  # this module's C kernels' level, capped; returned
    int ghess_isa_level  # the level in use (the baseline until set_isa)

cdef extern from "contract.h" nogil:
    # per-sample products with a Jacobian factor D (K, m): J v and J^T w
    void ghess_contract_f64(const double* D, const double* u, double* out, Py_ssize_t K,
                            Py_ssize_t m, Py_ssize_t k, int accumulate)
    void ghess_contract_f32(const float* D, const float* u, float* out, Py_ssize_t K,
                            Py_ssize_t m, Py_ssize_t k, int accumulate)
    void ghess_contract_t_f64(const double* D, const double* w, double* out, Py_ssize_t K,
                              Py_ssize_t m, Py_ssize_t k, int accumulate)
    void ghess_contract_t_f32(const float* D, const float* w, float* out, Py_ssize_t K,
                              Py_ssize_t m, Py_ssize_t k, int accumulate)

cdef extern from "skinny.h" nogil:
    # a^T b for a with at most GHESS_SKINNY_MAX columns, without BLAS
    int GHESS_SKINNY_MAX
    void ghess_skinny_tn_f64(const double* a, Py_ssize_t lda, const double* b, Py_ssize_t ldb,
                             double* out, Py_ssize_t ldo, Py_ssize_t m, Py_ssize_t k,
                             Py_ssize_t n, int accumulate)
    void ghess_skinny_tn_f32(const float* a, Py_ssize_t lda, const float* b, Py_ssize_t ldb,
                             float* out, Py_ssize_t ldo, Py_ssize_t m, Py_ssize_t k,
                             Py_ssize_t n, int accumulate)

cdef extern from "vecmath.h" nogil:
    # vectorisable float64 tanh and its derivatives (see the header)
    void ghess_tanh_block(const double* x, double* y, double* d1, double* d2, Py_ssize_t n)
    void ghess_tanhf_block(const float* x, float* y, float* d1, float* d2, Py_ssize_t n)
    # sigmoid, SiLU, GELU's tanh form and ELU (p0: alpha), the same way
    void ghess_sigmoid_block(const double* x, double* y, double* d1, double* d2, Py_ssize_t n,
                             double p0)
    void ghess_sigmoidf_block(const float* x, float* y, float* d1, float* d2, Py_ssize_t n,
                              double p0)
    void ghess_silu_block(const double* x, double* y, double* d1, double* d2, Py_ssize_t n,
                          double p0)
    void ghess_siluf_block(const float* x, float* y, float* d1, float* d2, Py_ssize_t n,
                           double p0)
    void ghess_gelu_tanh_block(const double* x, double* y, double* d1, double* d2,
                               Py_ssize_t n, double p0)
    void ghess_gelu_tanhf_block(const float* x, float* y, float* d1, float* d2, Py_ssize_t n,
                                double p0)
    void ghess_elu_block(const double* x, double* y, double* d1, double* d2, Py_ssize_t n,
                         double p0)
    void ghess_eluf_block(const float* x, float* y, float* d1, float* d2, Py_ssize_t n,
                          double p0)
    void ghess_gelu_block(const double* x, double* y, double* d1, double* d2, Py_ssize_t n,
                          double p0)
    void ghess_geluf_block(const float* x, float* y, float* d1, float* d2, Py_ssize_t n,
                           double p0)

cdef extern from "geometry.h" nogil:
    # a convolution's or pooling window's geometry (ghess.nn._window's 13 ints)
    ctypedef struct ghess_dc_geom:
        int C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w

cdef extern from "pooling.h" nogil:
    # one sample's max and average pooling, and max pooling's JVP (gather) and VJP (scatter)
    void ghess_maxpool_f64(const double* x, double* y, int32_t* argmax, const ghess_dc_geom* g)
    void ghess_maxpool_f32(const float* x, float* y, int32_t* argmax, const ghess_dc_geom* g)
    void ghess_gather_f64(const double* x, Py_ssize_t in_width, const int32_t* index,
                          const double* gain, double* out, Py_ssize_t m, Py_ssize_t k)
    void ghess_gather_f32(const float* x, Py_ssize_t in_width, const int32_t* index,
                          const float* gain, float* out, Py_ssize_t m, Py_ssize_t k)
    void ghess_scatter_f64(const double* g, Py_ssize_t m, const int32_t* index, const double* gain,
                           double* out, Py_ssize_t in_width, Py_ssize_t k, int distinct)
    void ghess_scatter_f32(const float* g, Py_ssize_t m, const int32_t* index, const float* gain,
                           float* out, Py_ssize_t in_width, Py_ssize_t k, int distinct)
    void ghess_avgpool_f64(const double* x, double* y, const ghess_dc_geom* g)
    void ghess_avgpool_f32(const float* x, float* y, const ghess_dc_geom* g)
    void ghess_avgpool_t_f64(const double* gy, double* gx, const ghess_dc_geom* g)
    void ghess_avgpool_t_f32(const float* gy, float* gx, const ghess_dc_geom* g)

cdef extern from "channel.h" nogil:
    # per-channel affine maps (bias, batch norm) and pairwise sums in double (see the header)
    void ghess_channel_affine_f64(const double* x, int kx, const double* a, int ka,
                                  const double* b, int kb, double* y, int k, int M,
                                  Py_ssize_t P, int accumulate)
    void ghess_channel_affine_f32(const float* x, int kx, const float* a, int ka,
                                  const float* b, int kb, float* y, int k, int M,
                                  Py_ssize_t P, int accumulate)
    double ghess_pairwise_sum_f64(const double* x, const double* y, Py_ssize_t count)
    double ghess_pairwise_sum_f32(const float* x, const float* y, Py_ssize_t count)
    double ghess_pairwise_sum_samples_f64(const double* x, Py_ssize_t x_stride, const double* y,
                                          Py_ssize_t y_stride, Py_ssize_t n, Py_ssize_t count)
    double ghess_pairwise_sum_samples_f32(const float* x, Py_ssize_t x_stride, const float* y,
                                          Py_ssize_t y_stride, Py_ssize_t n, Py_ssize_t count)

cdef extern from "direct_conv.h" nogil:
    # stride-1 (in width) convolutions without im2col, AVX-512 or AVX2 + FMA (at run time)
    int ghess_dc_vector_length(int isa, int is_double)
    Py_ssize_t ghess_dc_padded_size(const ghess_dc_geom* g)
    void ghess_dc_offsets(const ghess_dc_geom* g, int* off)
    void ghess_dc_pack_weights_f64(const double* w, int M, int K, double* Ap)
    void ghess_dc_pack_weights_f32(const float* w, int M, int K, float* Ap)
    void ghess_dc_pad_f64(const double* x, const ghess_dc_geom* g, double* xp)
    void ghess_dc_pad_f32(const float* x, const ghess_dc_geom* g, float* xp)
    void ghess_dc_forward_f64(int isa, const double* Ap, const double* bias, int M,
                              const double* xp, const int* off, const ghess_dc_geom* g,
                              double* out, int accumulate)
    void ghess_dc_forward_f32(int isa, const float* Ap, const float* bias, int M,
                              const float* xp, const int* off, const ghess_dc_geom* g,
                              float* out, int accumulate)
    Py_ssize_t ghess_dc_grad_panels_size(int M, int P, int vector_length)
    void ghess_dc_pack_grad_f64(int L, const double* g, int M, int P, double* gT)
    void ghess_dc_pack_grad_f32(int L, const float* g, int M, int P, float* gT)
    void ghess_dc_weight_grad_f64(int isa, const double* gT, int M, const double* xp,
                                  const int* off, const ghess_dc_geom* g, double* work)
    void ghess_dc_weight_grad_f32(int isa, const float* gT, int M, const float* xp,
                                  const int* off, const ghess_dc_geom* g, float* work)
    int GHESS_DC_MR
