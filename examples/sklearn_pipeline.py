"""A Newton-CG neural network inside a scikit-learn Pipeline, tuned by GridSearchCV.

``ghess.sklearn.NewtonCGClassifier`` is a scikit-learn estimator: it goes into a
``Pipeline`` after a ``StandardScaler`` and ``GridSearchCV`` tunes its ``alpha``
and width on scikit-learn's 8x8 digits (75/25 stratified split). The best model's
curvature is then one line away: the fitted estimator holds the ghess model, loss
and parameters, so the top Hessian eigenvalues of its training objective come
from ``ghess.top_eigenvalues``. Finally an ``MLPClassifier`` fitted by
scikit-learn is converted with ``ghess.from_sklearn`` and its curvature measured
the same way.

Run: ``python examples/sklearn_pipeline.py`` (about 15 seconds on 2 cores).
"""

import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import ghess
from ghess.interop.sklearn import sklearn_targets
from ghess.sklearn import NewtonCGClassifier


def main():
    """Tune, score, and measure the curvature of the chosen model; return its test accuracy."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y,
                                                        random_state=0)
    pipe = Pipeline([("scale", StandardScaler()),
                     ("net", NewtonCGClassifier(random_state=0))])
    grid = {"net__alpha": [1e-4, 1e-1, 1.0], "net__hidden_layer_sizes": [(32,), (100,)]}
    search = GridSearchCV(pipe, grid, cv=3)
    search.fit(X_train, y_train)
    for params, score in zip(search.cv_results_["params"],
                             search.cv_results_["mean_test_score"]):
        print(f"  {params}: cross-validated accuracy {score:.4f}")
    accuracy = search.score(X_test, y_test)
    print(f"best {search.best_params_}: test accuracy {accuracy:.4f}")

    # the curvature of the chosen network's training objective, on its scaled inputs
    scaler, net = search.best_estimator_["scale"], search.best_estimator_["net"]
    X_scaled = scaler.transform(X_train)
    targets = np.searchsorted(net.classes_, y_train)
    l2 = net.alpha / len(X_train) * net.model_.parameter_mask("weight")
    H = ghess.HessianLinearOperator(net.model_, net.loss_function_, net.params_,
                                    (X_scaled, targets), damping=l2)
    top = ghess.top_eigenvalues(H, k=3, seed=0)
    print(f"top-3 Hessian eigenvalues of its objective: {np.array2string(top, precision=4)}")

    # the same for a network scikit-learn trained itself
    mlp = MLPClassifier(hidden_layer_sizes=(32,), solver="lbfgs", max_iter=300,
                        random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(X_scaled, y_train)
    model, loss, params = ghess.from_sklearn(mlp)
    l2 = mlp.alpha / len(X_train) * model.parameter_mask("weight")
    H = ghess.HessianLinearOperator(model, loss, params,
                                    (X_scaled, sklearn_targets(mlp, y_train)), damping=l2)
    top = ghess.top_eigenvalues(H, k=3, seed=0)
    print(f"MLPClassifier (lbfgs): test accuracy {mlp.score(scaler.transform(X_test), y_test):.4f}"
          f", top-3 Hessian eigenvalues {np.array2string(top, precision=4)}")
    return accuracy


if __name__ == "__main__":
    main()
