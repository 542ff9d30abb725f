# The kinds that dense.pyx's kernels take as their int argument ``kind``. Python code passes a
# member of dense.ActivationKind or dense.OutputHessianKind.

cpdef enum ActivationKind:
    """The elementwise function of ``activation_forward``.

    Its parameters p0, p1: LEAKY_RELU's negative slope; SOFTPLUS's beta and threshold.
    TANH, SIGMOID, SILU, GELU_TANH and ELU run vectorised kernels (vecmath.h).
    """
    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2
    TANH = 3
    SIGMOID = 4
    SOFTPLUS = 5
    GELU = 6        # x Phi(x), Phi the standard normal CDF
    GELU_TANH = 7   # PyTorch's approximate="tanh": x sigma(2 sqrt(2/pi) (x + 0.044715 x^3))
    SILU = 8        # x sigma(x)
    ELU = 9         # p0: alpha; x for x > 0, alpha (e^x - 1) otherwise


# Kinds of output-space Hessian B_i, with the per-sample state they read (see
# losses.Loss.hessian_form); multiplied by a scale. Python sees them as the IntEnum
# dense.OutputHessianKind (IDENTITY, SOFTMAX, DIAGONAL), built from these values in
# dense.pyx. Not a cpdef enum: Cython's C has no scoped enums, so the members of every
# enum are names of the module, and IDENTITY is ActivationKind's.
cdef enum:
    B_IDENTITY = 0   # I (the squared error: scale = 2 * its reduction's)
    B_SOFTMAX = 1    # diag(p_i) - p_i p_i^T (softmax cross-entropy)
    B_DIAGONAL = 2   # diag(h_i) (BCE with logits: h = sigma')
