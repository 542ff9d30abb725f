"""ghess.sklearn: NewtonCGClassifier and NewtonCGRegressor as scikit-learn estimators."""

import pickle
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

import ghess

pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, make_multilabel_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import estimator_checks_generator  # noqa: E402

from ghess.sklearn import NewtonCGClassifier, NewtonCGRegressor  # noqa: E402

#: checks that do not apply (scikit-learn would skip them): the array-API check (the
#: estimators run NumPy arrays only, as MLPClassifier) and a check of decision_function,
#: which neither defines (nor does MLPClassifier)
NOT_APPLICABLE = {"check_array_api_input",
                  "check_classifiers_multilabel_output_format_decision_function"}


def _name(check):
    return getattr(check, "func", check).__name__


CHECKS = [(estimator, check)
          for proto in (NewtonCGClassifier(), NewtonCGRegressor())
          for estimator, check in estimator_checks_generator(proto, mark=None)
          if _name(check) not in NOT_APPLICABLE]


@pytest.mark.parametrize("estimator, check", CHECKS,
                         ids=[f"{type(e).__name__}-{_name(c)}" for e, c in CHECKS])
def test_sklearn_compatible_estimator(estimator, check):
    """Every check of sklearn.utils.estimator_checks.check_estimator that applies."""
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16, y, test_size=0.25, stratify=y, random_state=0)


def weight_penalty(est, n_samples):
    """scikit-learn's L2 term: alpha / (2 N) times the squared weights (no biases)."""
    W = est.params_ * est.model_.parameter_mask("weight")
    return est.alpha / (2 * n_samples) * float(W @ W)


def test_default_classifier_on_digits(digits):
    """The acceptance bar: at least 95% test accuracy with the defaults (75/25 split)."""
    X_train, X_test, y_train, y_test = digits
    clf = NewtonCGClassifier(random_state=0).fit(X_train, y_train)
    assert clf.score(X_test, y_test) >= 0.95
    assert clf.n_iter_ == len(clf.loss_curve_) and clf.loss_ == clf.loss_curve_[-1]
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_classifier_objective_is_scikit_learns(digits):
    """loss_ is MLPClassifier's objective: the mean log-loss plus alpha / (2N) ||W||^2."""
    X_train, _, y_train, _ = digits
    clf = NewtonCGClassifier(hidden_layer_sizes=(16,), alpha=0.5, max_iter=4,
                             random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
    expected = log_loss(y_train, clf.predict_proba(X_train)) + weight_penalty(clf, len(y_train))
    assert_allclose(clf.loss_, expected, rtol=1e-10)
    assert_allclose(clf.predict_log_proba(X_train), np.log(clf.predict_proba(X_train)),
                    rtol=1e-9, atol=1e-12)


def test_binary_and_multilabel_targets():
    X, y = load_digits(return_X_y=True)
    X, odd = X[:300] / 16, np.where(y[:300] % 2, "odd", "even")
    clf = NewtonCGClassifier(hidden_layer_sizes=(10,), random_state=0).fit(X, odd)
    assert clf.out_activation_ == "logistic" and clf.model_.n_outputs == 1
    assert list(clf.classes_) == ["even", "odd"]
    proba = clf.predict_proba(X)
    assert proba.shape == (300, 2)
    assert_allclose(proba.sum(axis=1), 1.0)
    assert np.mean(clf.predict(X) == odd) > 0.95
    expected = log_loss(odd, proba) + weight_penalty(clf, 300)
    assert_allclose(clf.loss_, expected, rtol=1e-10)

    X, Y = make_multilabel_classification(200, 10, n_classes=4, random_state=0)
    clf = NewtonCGClassifier(hidden_layer_sizes=(10,), random_state=0).fit(X, Y)
    assert clf.predict(X).shape == Y.shape and clf.predict_proba(X).shape == Y.shape
    p = np.clip(clf.predict_proba(X), 1e-300, 1)
    # scikit-learn's multi-label log-loss: summed over the labels, mean over the samples
    each = -(Y * np.log(p) + (1 - Y) * np.log1p(-np.minimum(p, 1 - 1e-16)))
    assert_allclose(clf.loss_, each.sum(axis=1).mean() + weight_penalty(clf, 200), rtol=1e-8)


def test_regressor_objective_and_fit():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2]
    reg = NewtonCGRegressor(hidden_layer_sizes=(20,), activation="tanh", subsample=1.0,
                            random_state=0).fit(X, y)
    assert reg.predict(X).shape == (300,)
    assert reg.score(X, y) > 0.95
    half_mse = 0.5 * np.mean((reg.predict(X) - y) ** 2)
    assert_allclose(reg.loss_, half_mse + weight_penalty(reg, 300), rtol=1e-10)
    Y = np.c_[y, -2 * y]
    reg2 = NewtonCGRegressor(hidden_layer_sizes=(20,), activation="tanh", random_state=0)
    assert reg2.fit(X, Y).predict(X).shape == (300, 2)


def test_pipeline_and_grid_search(digits):
    X_train, X_test, y_train, y_test = digits
    pipe = make_pipeline(StandardScaler(), NewtonCGClassifier(max_iter=15, random_state=0))
    search = GridSearchCV(pipe, {"newtoncgclassifier__alpha": [1e-4, 1.0],
                                 "newtoncgclassifier__hidden_layer_sizes": [(32,)]}, cv=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X_train, y_train)
    assert search.best_score_ > 0.9
    assert search.score(X_test, y_test) > 0.9
    assert search.best_estimator_[-1].alpha in (1e-4, 1.0)


def test_conv_layers_and_input_shape(digits):
    """layers= runs a conv net on flattened 8x8 images; the estimator copies, never changes, it."""
    X_train, X_test, y_train, y_test = digits
    layers = [ghess.Conv2d(1, 4, 3, padding=1), ghess.ReLU(), ghess.MaxPool2d(2)]
    clf = NewtonCGClassifier(layers=layers, input_shape=(1, 8, 8), max_iter=15,
                             random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
    assert [type(layer).__name__ for layer in clf.model_.layers] == [
        "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert clf.model_.input_shape == (1, 8, 8)
    assert clf.score(X_test, y_test) > 0.9
    assert clone(clf).get_params()["layers"] is not layers  # clone deep-copies
    assert clf.layers is layers and clf.model_.layers[0] is not layers[0]
    with pytest.raises(ValueError, match=r"input_shape \(1, 7, 7\) holds 49 values per "
                                         r"sample, but X has 64 features"):
        clf.set_params(input_shape=(1, 7, 7)).fit(X_train, y_train)


def test_float32_warm_start_and_pickle(digits):
    X_train, X_test, y_train, y_test = digits
    clf = NewtonCGClassifier(hidden_layer_sizes=(24,), dtype="float32", max_iter=3,
                             random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
        assert clf.params_.dtype == np.float32
        first = clf.params_.copy()
        clf.set_params(warm_start=True).fit(X_train, y_train)
    # warm start continues from the fitted parameters instead of a fresh initialisation
    assert clf.loss_curve_[0] < NewtonCGClassifier(
        hidden_layer_sizes=(24,), dtype="float32", max_iter=1, random_state=0).fit(
        X_train, y_train).loss_curve_[0]
    assert not np.array_equal(first, clf.params_)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(X_test), clf.predict_proba(X_test))


def test_same_random_state_same_model(digits):
    X_train, _, y_train, _ = digits
    a = NewtonCGClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=3)
    b = clone(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        np.testing.assert_array_equal(a.fit(X_train, y_train).params_,
                                      b.fit(X_train, y_train).params_)


def test_convergence_warning_and_stopping(digits):
    X_train, _, y_train, _ = digits
    with pytest.warns(ConvergenceWarning, match="max_iter=2 Newton iterations"):
        NewtonCGClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(
            X_train, y_train)
    clf = NewtonCGClassifier(hidden_layer_sizes=(8,), tol=10.0, max_iter=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf.fit(X_train, y_train)  # converged: no warning
    assert clf.n_iter_ <= 5


@pytest.mark.parametrize("params, error, match", [
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(hidden_layer_sizes=(10, 0)), ValueError, "hidden_layer_sizes entries must be"),
    (dict(hidden_layer_sizes="wide"), TypeError, "hidden_layer_sizes entries must be"),
    (dict(alpha=-1.0), ValueError, "alpha must be a finite number >= 0"),
    (dict(max_iter=0), ValueError, "max_iter must be an int >= 1"),
    (dict(tol=np.nan), ValueError, "tol must be a finite number"),
    (dict(dtype="float16"), ValueError, "dtype must be 'float64' or 'float32'"),
    (dict(layers=[ghess.ReLU(), "conv"]), TypeError, "layers must be a list of ghess layers"),
    (dict(subsample=0.0), ValueError, "subsample"),
    (dict(n_threads=0), ValueError, "n_threads"),
])
def test_bad_hyper_parameters_named_at_fit(params, error, match):
    X, y = load_digits(return_X_y=True)
    clf = NewtonCGClassifier(**params)  # set as given, checked at fit (scikit-learn's rule)
    with pytest.raises(error, match=match):
        clf.fit(X[:50], y[:50])


def test_unfitted_and_one_class():
    X, y = load_digits(return_X_y=True)
    with pytest.raises(NotFittedError):
        NewtonCGClassifier().predict(X)
    with pytest.raises(ValueError, match="at least 2 classes in y, got 1 class"):
        NewtonCGClassifier().fit(X[:20], np.zeros(20))
