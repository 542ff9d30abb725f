"""scikit-learn estimators trained by subsampled Newton-CG (needs scikit-learn, >= 1.6).

:class:`NewtonCGClassifier` and :class:`NewtonCGRegressor` take the parameters
of scikit-learn's ``MLPClassifier`` / ``MLPRegressor`` where they mean the same
(``hidden_layer_sizes``, ``activation``, ``alpha``, ``max_iter``, ``tol``,
``n_iter_no_change``, ``random_state``, ``verbose``, ``warm_start``) and minimise
the same objective, scikit-learn's data term plus ``alpha / (2 N) * sum(W**2)``
over the weights, by :class:`ghess.NewtonCG`. ``layers=`` (with ``input_shape=``
for images given as flat rows) replaces the hidden layers by any ghess layers,
convolutions included; the output layer is added to fit the targets.
"""

from __future__ import annotations

import copy
import numbers
import warnings

import numpy as np
from scipy.special import expit, log_expit, log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .nn import Flatten, Layer, Linear, ReLU, Sequential, Sigmoid, Tanh
from .nn.losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .optim import NewtonCG

__all__ = ["NewtonCGClassifier", "NewtonCGRegressor"]

#: hidden activations by scikit-learn's names (identity: no layer)
_ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "logistic": Sigmoid, "identity": None}


def _check_int(value, name, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def _check_real(value, name, low, *, strict=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not np.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                         f"got {value!r}")
    return float(value)


class _BaseNewtonCG(BaseEstimator):
    """Shared by the classifier and the regressor: parameters, model, fit loop."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, layers=None,
                 input_shape=None, alpha=1e-4, max_iter=100, tol=1e-4, n_iter_no_change=5,
                 subsample=0.2, damping=1.0, cg_rtol=0.1, cg_maxiter=250,
                 dtype="float64", n_threads=None, random_state=None, verbose=False,
                 warm_start=False):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.layers = layers
        self.input_shape = input_shape
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.subsample = subsample
        self.damping = damping
        self.cg_rtol = cg_rtol
        self.cg_maxiter = cg_maxiter
        self.dtype = dtype
        self.n_threads = n_threads
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    # -- checks and the network --------------------------------------------
    def _check_params(self):
        """Validate the hyper-parameters (at fit, as scikit-learn does)."""
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")
        _check_real(self.alpha, "alpha", 0.0)
        _check_int(self.max_iter, "max_iter", 1)
        _check_real(self.tol, "tol", 0.0)
        _check_int(self.n_iter_no_change, "n_iter_no_change", 1)
        if self.layers is None:
            if self.activation not in _ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got "
                                 f"{self.activation!r}")
            sizes = self.hidden_layer_sizes
            sizes = (sizes,) if isinstance(sizes, numbers.Integral) else sizes
            try:
                sizes = tuple(sizes)
            except TypeError:
                raise TypeError(f"hidden_layer_sizes must be a tuple of ints >= 1, got "
                                f"{self.hidden_layer_sizes!r}") from None
            return tuple(_check_int(s, "hidden_layer_sizes entries", 1) for s in sizes)
        if isinstance(self.layers, Layer) or not all(
                isinstance(layer, Layer) for layer in self.layers):
            raise TypeError(f"layers must be a list of ghess layers, got {self.layers!r}")
        return None

    def _input_shape(self, n_features):
        if self.input_shape is None:
            return (n_features,)
        shape = tuple(self.input_shape)
        if int(np.prod(shape)) != n_features:
            raise ValueError(f"input_shape {shape} holds {int(np.prod(shape))} values per "
                             f"sample, but X has {n_features} features")
        return shape

    def _build_model(self, sizes, n_features, n_outputs):
        """Build the hidden layers (``layers`` or the MLP) and an output ``Linear``."""
        input_shape = self._input_shape(n_features)
        if sizes is None:
            # copies: a layer records its input geometry, and the parameter stays as given
            hidden = [copy.deepcopy(layer) for layer in self.layers]
        else:
            hidden, width, act = [], n_features, _ACTIVATIONS[self.activation]
            for size in sizes:
                hidden += [Linear(width, size)] + ([act()] if act is not None else [])
                width = size
        shape = input_shape
        for i, layer in enumerate(hidden):
            try:
                shape = tuple(layer.output_shape(shape))
            except ValueError as exc:
                raise ValueError(f"layers[{i}] ({type(layer).__name__}): {exc}") from None
        if len(shape) != 1:
            hidden.append(Flatten())
        return Sequential(*hidden, Linear(int(np.prod(shape)), n_outputs),
                          input_shape=input_shape)

    def _fit_dtype(self):
        """Return the NumPy dtype of ``dtype``: what X is validated into."""
        return np.float32 if self.dtype == "float32" else np.float64

    def _reshape(self, X):
        return X.reshape((X.shape[0],) + self.model_.input_shape)

    def _outputs(self, X):
        """Network outputs (logits or predictions) for validated rows X."""
        check_is_fitted(self, "params_")
        X = validate_data(self, X, reset=False, dtype=np.dtype(self.params_.dtype))
        return self.model_.forward(self.params_, self._reshape(X), n_threads=self.n_threads)

    # -- training ------------------------------------------------------------
    def _fit(self, X, targets, loss, n_outputs):
        sizes = self._check_params()
        rng = check_random_state(self.random_state)
        n_samples = X.shape[0]
        warm = self.warm_start and hasattr(self, "params_")
        if warm:
            model = self.model_
            if model.n_outputs != n_outputs or model.input_shape != self._input_shape(
                    X.shape[1]):
                raise ValueError(f"warm_start: the data need a network with {n_outputs} "
                                 f"outputs and input {self._input_shape(X.shape[1])}, but the "
                                 f"fitted one has {model.n_outputs} and {model.input_shape}")
            theta = self.params_.astype(self.dtype)
        else:
            model = self._build_model(sizes, X.shape[1], n_outputs)
            theta = model.init_params(rng.randint(np.iinfo(np.int32).max), dtype=self.dtype)
        # scikit-learn's L2: alpha / (2 N) ||W||^2, the weights only
        weights = model.parameter_mask("weight")
        with np.errstate(divide="ignore"):
            C = n_samples / (self.alpha * weights)
        opt = NewtonCG(model, loss, C=C, subsample=self.subsample, cg_rtol=self.cg_rtol,
                       cg_maxiter=self.cg_maxiter, damping=self.damping,
                       n_threads=self.n_threads, seed=rng.randint(np.iinfo(np.int32).max))
        curve, stall, converged = [], [0], [False]

        def stop(theta, record):
            curve.append(record.objective)
            # scikit-learn's rules: no improvement by tol for n_iter_no_change iterations
            # (its SGD solvers), or no gradient entry above tol (lbfgs's gtol)
            best = min(curve[:-1], default=np.inf)
            stall[0] = stall[0] + 1 if record.objective > best - self.tol else 0
            converged[0] = stall[0] >= self.n_iter_no_change or record.grad_max <= self.tol
            return converged[0]

        Xs = X.reshape((n_samples,) + model.input_shape)
        theta, history = opt.fit(theta, (Xs, targets), self.max_iter, verbose=bool(self.verbose),
                                 callback=stop)
        self.model_, self.params_, self.loss_function_ = model, theta, loss
        self.loss_curve_ = curve
        self.loss_ = curve[-1] if curve else float(opt.objective(theta, (Xs, targets))[0])
        self.n_iter_ = len(history)
        if not converged[0] and self.n_iter_ == self.max_iter:
            warnings.warn(f"{type(self).__name__}: max_iter={self.max_iter} Newton iterations "
                          f"reached before the objective stopped improving by tol={self.tol}",
                          ConvergenceWarning, stacklevel=3)
        return self


class NewtonCGClassifier(ClassifierMixin, _BaseNewtonCG):
    """A neural-network classifier trained by subsampled Newton-CG (ghess's engine).

    Multi-class (softmax cross-entropy), binary (one logistic output) and
    multi-label (a logistic output per label) targets, with scikit-learn's
    ``MLPClassifier`` objective: log-loss plus ``alpha / (2 N) * sum(W**2)``.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(100,)
        Widths of the hidden ``Linear`` layers (unused when ``layers`` is given).
    activation : {"relu", "tanh", "logistic", "identity"}, default="relu"
    layers : list of ghess layers, optional
        The hidden network, e.g. ``[Conv2d(1, 8, 3), ReLU(), MaxPool2d(2)]``; a
        ``Flatten`` and the output ``Linear`` are appended. It is copied, never
        modified.
    input_shape : tuple of int, optional
        The shape of one sample when each row of X is a flattened image, e.g.
        ``(1, 8, 8)``; by default ``(n_features,)``.
    alpha : float, default=1e-4
        L2 penalty on the weights, scaled as scikit-learn scales it.
    max_iter : int, default=100
        Newton iterations at most.
    tol : float, default=1e-4
        Training stops once the objective has not improved by ``tol`` for
        ``n_iter_no_change`` iterations in a row, or once no entry of its
        gradient exceeds ``tol`` in magnitude (``MLPClassifier``'s rules for its
        stochastic solvers and for lbfgs).
    n_iter_no_change : int, default=5
    subsample : float or int, default=0.2
        Fraction (or number) of the samples drawn afresh each iteration for the
        Gauss-Newton matrix (see :class:`ghess.NewtonCG`); the gradient always
        uses all of them.
    damping, cg_rtol, cg_maxiter
        Initial Levenberg-Marquardt damping and the CG stopping rule, as in
        :class:`ghess.NewtonCG`.
    dtype : {"float64", "float32"}, default="float64"
        The precision of the parameters and the computation.
    n_threads : int, optional
    random_state : int, RandomState instance or None, default=None
        The initial weights and the subsamples.
    verbose : bool, default=False
        Print one line per Newton iteration.
    warm_start : bool, default=False
        Continue from the fitted parameters (the damping restarts).

    Attributes
    ----------
    classes_ : ndarray
    loss_ : float
        The objective at the end of training.
    loss_curve_ : list of float
        The objective after each iteration.
    n_iter_ : int
        Newton iterations run by the last ``fit``.
    model_ : ghess.Sequential
    params_ : ndarray
        The flat parameters of ``model_``.
    loss_function_ : ghess loss
        The data term, for ghess's operators: ``GGNLinearOperator(clf.model_,
        clf.loss_function_, clf.params_, ...)``.
    out_activation_ : {"softmax", "logistic"}
    n_features_in_, feature_names_in_
        As in every scikit-learn estimator.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from ghess.sklearn import NewtonCGClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = NewtonCGClassifier(hidden_layer_sizes=(32,), max_iter=10, random_state=0)
    >>> clf.fit(X / 16, y).score(X / 16, y) > 0.9
    True
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def fit(self, X, y):
        """Train on X (n_samples, n_features) and class labels y; return self."""
        X, y = validate_data(self, X, y, multi_output=True, dtype=self._fit_dtype())
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if self.warm_start and hasattr(self, "classes_"):
            binarizer = self._label_binarizer
            if set(np.unique(y)) - set(binarizer.classes_) and y.ndim == 1:
                raise ValueError(f"warm_start: y has classes not in classes_ "
                                 f"{binarizer.classes_.tolist()}")
        else:
            binarizer = LabelBinarizer().fit(y)
        if len(binarizer.classes_) < 2:
            raise ValueError(f"NewtonCGClassifier needs at least 2 classes in y, got "
                             f"{len(binarizer.classes_)} class")
        self._label_binarizer = binarizer
        self.classes_ = binarizer.classes_
        indicator = binarizer.transform(y).astype(self.dtype)
        if binarizer.y_type_ == "multiclass":
            self.out_activation_ = "softmax"
            targets = np.searchsorted(self.classes_, y).astype(np.intp)
            loss = CrossEntropyLoss()
        else:  # binary (one output) or multi-label: log-loss summed over the outputs
            self.out_activation_ = "logistic"
            targets = indicator
            loss = BCEWithLogitsLoss(factor=float(indicator.shape[1]))
        return self._fit(X, targets, loss, indicator.shape[1])

    def predict_proba(self, X):
        """Class probabilities, (n_samples, n_classes); (n_samples, n_labels) if multi-label."""
        z = self._outputs(X)
        if self.out_activation_ == "softmax":
            return softmax(z, axis=1)
        p = expit(z)
        return np.hstack([1 - p, p]) if self._label_binarizer.y_type_ == "binary" else p

    def predict_log_proba(self, X):
        """Return the logarithm of :meth:`predict_proba`, computed without underflow."""
        z = self._outputs(X)
        if self.out_activation_ == "softmax":
            return log_softmax(z, axis=1)
        if self._label_binarizer.y_type_ == "binary":
            return np.hstack([log_expit(-z), log_expit(z)])
        return log_expit(z)

    def predict(self, X):
        """Predicted classes (or the label indicator matrix, multi-label)."""
        z = self._outputs(X)
        if self.out_activation_ == "softmax":
            return self.classes_[np.argmax(z, axis=1)]
        return self._label_binarizer.inverse_transform(expit(z))


class NewtonCGRegressor(RegressorMixin, _BaseNewtonCG):
    """A neural-network regressor trained by subsampled Newton-CG (ghess's engine).

    scikit-learn's ``MLPRegressor`` objective: half the mean squared error plus
    ``alpha / (2 N) * sum(W**2)``; one or several outputs. The parameters and
    attributes are :class:`NewtonCGClassifier`'s, less the classes.

    Examples
    --------
    >>> import numpy as np
    >>> from ghess.sklearn import NewtonCGRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 3)); y = np.sin(X[:, 0]) + X[:, 1] ** 2
    >>> reg = NewtonCGRegressor(hidden_layer_sizes=(20,), activation="tanh", random_state=0)
    >>> reg.fit(X, y).score(X, y) > 0.95
    True
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Train on X (n_samples, n_features) and real targets y; return self."""
        dtype = self._fit_dtype()
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=dtype)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        self._y_ndim = y.ndim
        targets = np.asarray(y, dtype=dtype).reshape(len(y), -1)
        self.out_activation_ = "identity"
        return self._fit(X, targets, MSELoss(factor=0.5), targets.shape[1])

    def predict(self, X):
        """Predictions, (n_samples,) or (n_samples, n_outputs) as y was."""
        z = self._outputs(X)
        return z[:, 0] if self._y_ndim == 1 else z
