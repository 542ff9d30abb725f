"""ghess.from_sklearn: fitted MLPs to (model, loss, params), checked against scikit-learn."""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.special import expit, softmax

import ghess
from ghess.interop.sklearn import sklearn_targets

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits, make_multilabel_classification  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

ACTIVATIONS = ["relu", "tanh", "logistic", "identity"]
KINDS = ["multiclass", "binary", "multilabel", "regression", "regression-2d"]


def fitted(kind, activation, dtype=np.float64):
    """Return an lbfgs-fitted estimator of ``kind`` and its training data."""
    X, y = load_digits(return_X_y=True)
    X, y = (X[:240] / 16).astype(dtype), y[:240]
    options = dict(activation=activation, solver="lbfgs", max_iter=40, alpha=0.03,
                   random_state=0)
    if kind == "multiclass":
        est = MLPClassifier(hidden_layer_sizes=(12, 7), **options)
    elif kind == "binary":
        est, y = MLPClassifier(hidden_layer_sizes=(9,), **options), np.where(y % 2, "odd", "even")
    elif kind == "multilabel":
        X, y = make_multilabel_classification(150, 10, n_classes=4, random_state=0)
        X = X.astype(dtype)
        est = MLPClassifier(hidden_layer_sizes=(8,), **options)
    elif kind == "regression":
        est, y = MLPRegressor(hidden_layer_sizes=(10,), **options), y.astype(dtype)
    else:
        est = MLPRegressor(hidden_layer_sizes=(10, 5), **options)
        y = np.c_[y, np.sin(y)].astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs stopping at max_iter
        est.fit(X, y)
    return est, X, y


def probabilities(est, kind, z):
    """Return what predict_proba (classifiers) or predict (regressors) gives, from logits z."""
    if kind == "multiclass":
        return softmax(z, axis=1)
    if kind == "binary":
        p = expit(z)
        return np.hstack([1 - p, p])
    if kind == "multilabel":
        return expit(z)
    return z[:, 0] if kind == "regression" else z


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_from_sklearn_reproduces_predictions_and_loss(kind, activation):
    """predict_proba / predict to 1e-10, and loss_ (data term + L2 diagonal) to 1e-8."""
    est, X, y = fitted(kind, activation)
    model, loss, params = ghess.from_sklearn(est)
    assert params.dtype == np.float64
    assert model.n_params == sum(W.size + b.size for W, b in zip(est.coefs_, est.intercepts_))
    z = model.forward(params, X)
    expected = est.predict(X) if kind.startswith("regression") else est.predict_proba(X)
    assert_allclose(probabilities(est, kind, z), expected, rtol=1e-10, atol=1e-13)
    if not kind.startswith("regression"):
        labels = np.argmax(z, axis=1) if kind == "multiclass" else (z > 0).astype(int)
        if kind != "multilabel":
            labels = est.classes_[labels.reshape(-1)]
        np.testing.assert_array_equal(labels, est.predict(X))
    targets = sklearn_targets(est, y)
    l2 = est.alpha / len(X) * model.parameter_mask("weight")
    value, grad = ghess.loss_and_grad(model, loss, params, (X, targets))
    assert_allclose(value + 0.5 * params @ (l2 * params), est.loss_, rtol=1e-8)


def test_from_sklearn_gradient_vanishes_at_an_lbfgs_minimum():
    """The objective ghess assembles is the one scikit-learn minimised: its gradient is ~0."""
    X, y = load_digits(return_X_y=True)
    X, y = X[:200] / 16, y[:200]
    est = MLPClassifier(hidden_layer_sizes=(6,), activation="tanh", solver="lbfgs", alpha=1.0,
                        tol=1e-15, max_iter=20000, max_fun=100000, random_state=0).fit(X, y)
    model, loss, params = ghess.from_sklearn(est)
    _, grad = ghess.loss_and_grad(model, loss, params, (X, sklearn_targets(est, y)))
    weights = model.parameter_mask("weight")

    def residual(l2):  # at the minimiser grad L = -l2 * params
        return np.max(np.abs(grad + l2 * params))

    scale = np.max(np.abs(est.alpha / 200 * weights * params))
    assert residual(est.alpha / 200 * weights) < 1e-2 * scale
    # a penalised bias, or a misplaced 1/2, would leave a gradient of the L2 term's size
    assert residual(est.alpha / 200 * np.ones_like(weights)) > 0.2 * scale
    assert residual(est.alpha / 400 * weights) > 0.2 * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_sklearn_keeps_the_dtype(dtype):
    """Adam keeps float32 coefficients for float32 X (lbfgs returns float64): so does ghess."""
    X, y = load_digits(return_X_y=True)
    X = (X[:200] / 16).astype(dtype)
    est = MLPClassifier(hidden_layer_sizes=(8,), solver="adam", max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y[:200])
    model, _, params = ghess.from_sklearn(est)
    assert est.coefs_[0].dtype == params.dtype == dtype
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    assert_allclose(softmax(model.forward(params, X).astype(np.float64), axis=1),
                    est.predict_proba(X), rtol=rtol, atol=rtol * 1e-2)


def test_from_sklearn_operators_run_on_the_converted_model():
    """The GGN of the converted classifier, with the L2 diagonal as damping, is SPD."""
    est, X, y = fitted("multiclass", "relu")
    model, loss, params = ghess.from_sklearn(est)
    l2 = est.alpha / len(X) * model.parameter_mask("weight")
    G = ghess.GGNLinearOperator(model, loss, params, (X, sklearn_targets(est, y)), damping=l2)
    v = np.random.default_rng(0).normal(size=model.n_params)
    plain = ghess.GGNLinearOperator(model, loss, params, (X, sklearn_targets(est, y)))
    assert_allclose(G @ v, plain @ v + l2 * v, rtol=1e-12, atol=1e-15)
    assert v @ (G @ v) > 0


def test_from_sklearn_bad_input():
    X, y = load_digits(return_X_y=True)
    with pytest.raises(NotFittedError, match="not fitted"):
        ghess.from_sklearn(MLPClassifier())
    with pytest.raises(TypeError, match="MLPClassifier or MLPRegressor, got StandardScaler"):
        ghess.from_sklearn(StandardScaler())
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(X[:100], y[:100])
    with pytest.raises(TypeError, match=r"pipeline\[-1\]"):
        ghess.from_sklearn(pipe)
    assert ghess.from_sklearn(pipe[-1])[0].n_outputs == 10
    poisson = MLPRegressor(loss="poisson", hidden_layer_sizes=(3,), max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        poisson.fit(X[:50], y[:50] + 1.0)
    with pytest.raises(ValueError, match="output activation 'exp'"):
        ghess.from_sklearn(poisson)
    est, X, y = fitted("multiclass", "relu")
    with pytest.raises(ValueError, match=r"not fitted on: \[42\]"):
        sklearn_targets(est, np.r_[y[:3], 42])
