"""The benchmark problems: networks, batches, and the weights, data and directions.

Every implementation of a configuration runs on the same :class:`Setup`, drawn by
:func:`make_setup` with seed 0. Only ghess's public API is used here: ``bench/ab.py``
builds these problems under two different builds of ghess.
"""

from typing import NamedTuple

#: per-sample Jacobians above this many float64 bytes run on a sub-batch ...
JACOBIAN_FULL_LIMIT = 2 * 2**30
#: ... of as many samples as fit in this many float64 bytes
JACOBIAN_SUBBATCH_BYTES = 256 * 2**20

#: the problems ``bench/run.py`` runs by default
DEFAULT_PROBLEMS = ("MLP-S", "MLP-M", "MLP-M-tanh", "CNN-S", "CNN-C")
#: the tiny ones of ``--quick``
QUICK_PROBLEMS = ("tiny", "tiny-cnn")


def all_problems():
    """Name -> (model factory, batch); PyTorch layouts, NCHW."""
    import ghess as G

    return {
        "MLP-S": (lambda: G.Sequential(G.Linear(784, 256), G.Tanh(), G.Linear(256, 10),
                                       input_shape=(784,)), 256),
        "MLP-M": (lambda: G.Sequential(G.Linear(784, 512), G.ReLU(), G.Linear(512, 512),
                                       G.ReLU(), G.Linear(512, 10), input_shape=(784,)), 1024),
        "MLP-M-tanh": (lambda: G.Sequential(G.Linear(784, 512), G.Tanh(), G.Linear(512, 512),
                                            G.Tanh(), G.Linear(512, 10), input_shape=(784,)),
                       1024),
        # the activations with curvature PyTorch models use today (not in the default run)
        "MLP-M-gelu": (lambda: G.Sequential(G.Linear(784, 512), G.GELU(), G.Linear(512, 512),
                                            G.SiLU(), G.Linear(512, 10), input_shape=(784,)),
                       1024),
        "CNN-S": (lambda: G.Sequential(
            G.Conv2d(1, 16, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(16, 32, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Flatten(), G.Linear(32 * 7 * 7, 10), input_shape=(1, 28, 28)), 128),
        "CNN-C": (lambda: G.Sequential(
            G.Conv2d(3, 32, 5, padding=2), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(32, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(64, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Flatten(), G.Linear(64 * 4 * 4, 10), input_shape=(3, 32, 32)), 64),
        # a CIFAR ResNet: three stages of one basic block each (conv-bn-relu-conv-bn plus
        # the shortcut, a strided 1x1 conv + batch norm where the shape changes), widths
        # 16-32-64, global average pooling; batch norm with drawn running statistics
        "ResNet-C": (resnet_c, 64),
        "tiny": (lambda: G.Sequential(G.Linear(20, 16), G.Tanh(), G.Linear(16, 4),
                                      input_shape=(20,)), 32),
        "tiny-cnn": (lambda: G.Sequential(G.Conv2d(1, 4, 3, padding=1), G.ReLU(),
                                          G.MaxPool2d(2), G.Flatten(), G.Linear(64, 3),
                                          input_shape=(1, 8, 8)), 16),
    }


def resnet_c():
    """Build the ResNet-C problem's model (see ``all_problems``)."""
    import numpy as np

    import ghess as G

    rng = np.random.default_rng(7)

    def bn(channels):
        return G.BatchNorm2d(channels, running_mean=rng.normal(scale=0.2, size=channels),
                             running_var=rng.uniform(0.5, 1.5, size=channels))

    def block(cin, cout, stride):
        shortcut = None if stride == 1 and cin == cout else [
            G.Conv2d(cin, cout, 1, stride=stride, bias=False), bn(cout)]
        return G.Residual(G.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                          bn(cout), G.ReLU(),
                          G.Conv2d(cout, cout, 3, padding=1, bias=False), bn(cout),
                          shortcut=shortcut)

    return G.Sequential(G.Conv2d(3, 16, 3, padding=1, bias=False), bn(16), G.ReLU(),
                        block(16, 16, 1), G.ReLU(), block(16, 32, 2), G.ReLU(),
                        block(32, 64, 2), G.ReLU(), G.AdaptiveAvgPool2d(1), G.Flatten(),
                        G.Linear(64, 10), input_shape=(3, 32, 32))


class Setup(NamedTuple):
    """One configuration's model, data and vectors, shared by every implementation."""

    model: object
    loss: object
    theta: object  # (n_params,)
    X: object  # (N, *input_shape)
    y: object  # (N,) labels
    V: object  # (16, n_params) directions
    v: object  # V[0]
    Xj: object  # the samples of the per-sample Jacobian operations
    threads: int
    ops: object = None  # the operations (``Op.op``) to set up; None: all

    def wants(self, op):
        """Whether operation ``op`` (e.g. "GGN product") is to be set up."""
        return self.ops is None or op in self.ops


def jacobian_samples(model, n_samples):
    """How many samples the per-sample Jacobian operations use (sized in float64)."""
    per_sample = model.n_outputs * model.n_params * 8
    if n_samples * per_sample <= JACOBIAN_FULL_LIMIT:
        return n_samples
    return max(1, JACOBIAN_SUBBATCH_BYTES // per_sample)


def make_setup(problem, dtype_name, threads, batch=None, ops=None):
    """Build the model, draw weights, data and directions (seed 0).

    ``batch`` overrides the problem's batch size; ``ops`` limits the operations that
    the competitors set up (a set of ``Op.op`` names, None for all).
    """
    import numpy as np

    import ghess

    make_model, default_batch = all_problems()[problem]
    batch = default_batch if batch is None else batch
    model = make_model()
    dtype = np.dtype(dtype_name)
    rng = np.random.default_rng(0)
    theta = model.init_params(seed=0, dtype=dtype)
    X = rng.normal(size=(batch,) + model.input_shape).astype(dtype)
    y = rng.integers(0, model.n_outputs, size=batch)
    V = rng.normal(size=(16, model.n_params)).astype(dtype)
    return Setup(model, ghess.CrossEntropyLoss(reduction="sum"), theta, X, y, V, V[0],
                 X[:jacobian_samples(model, batch)], threads,
                 None if ops is None else frozenset(ops))
