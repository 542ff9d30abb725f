r"""Conversion of fitted scikit-learn MLPs to ghess (needs scikit-learn, an optional extra).

:func:`from_sklearn` turns a fitted ``MLPClassifier`` or ``MLPRegressor`` into a
ghess ``Sequential``, the loss scikit-learn minimises and the flat parameters;
:func:`sklearn_targets` turns the estimator's ``y`` into that loss's targets.

scikit-learn's objective on ``N`` training samples is the data term plus
``alpha / (2 N) * sum(W**2)`` over the weights only (not the biases). In ghess terms::

    model, loss, params = ghess.from_sklearn(est)
    l2 = est.alpha / N * model.parameter_mask("weight")   # the L2 term's diagonal
    objective = ghess.loss_and_grad(model, loss, params, (X, t))[0] \\
        + 0.5 * params @ (l2 * params)                      # == est.loss_ (lbfgs)

with ``t = sklearn_targets(est, y)``; ``l2`` is also the damping that adds the L2
term's curvature to an operator (``GGNLinearOperator(..., damping=l2)``), and
``NewtonCG(C=1 / l2)`` minimises the same objective.
"""

import numpy as np

from ..nn import CrossEntropyLoss, Linear, MSELoss, ReLU, Sequential, Sigmoid, Tanh
from ..nn.losses import BCEWithLogitsLoss

__all__ = ["from_sklearn", "sklearn_targets"]

#: scikit-learn's hidden activations and their ghess layers (identity: none)
_HIDDEN = {"relu": ReLU, "tanh": Tanh, "logistic": Sigmoid, "identity": None}


def _check_fitted_mlp(estimator):
    """Return ``"classifier"`` or ``"regressor"`` for a fitted MLP, else raise."""
    from sklearn.exceptions import NotFittedError
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.utils.validation import check_is_fitted

    if isinstance(estimator, MLPClassifier):
        kind = "classifier"
    elif isinstance(estimator, MLPRegressor):
        kind = "regressor"
    else:
        hint = (" (for a Pipeline, convert its last step: pipeline[-1], and feed it the "
                "transformed X: pipeline[:-1].transform(X))"
                if hasattr(estimator, "steps") else "")
        raise TypeError(f"from_sklearn: expected a fitted sklearn.neural_network.MLPClassifier "
                        f"or MLPRegressor, got {type(estimator).__name__}{hint}")
    try:
        check_is_fitted(estimator, "coefs_")
    except NotFittedError:
        raise NotFittedError(f"from_sklearn: this {type(estimator).__name__} is not fitted "
                             f"yet; call fit(X, y) first") from None
    if estimator.activation not in _HIDDEN:
        raise ValueError(f"from_sklearn: activation {estimator.activation!r} is not supported; "
                         f"expected one of {sorted(_HIDDEN)}")
    if estimator.out_activation_ not in ("softmax", "logistic", "identity"):
        raise ValueError(f"from_sklearn: output activation {estimator.out_activation_!r} (loss "
                         f"{getattr(estimator, 'loss', None)!r}) is not supported; ghess "
                         f"converts the softmax, logistic and identity outputs (log-loss and "
                         f"squared error)")
    return kind


def from_sklearn(estimator):
    """Convert a fitted scikit-learn MLP to ``(model, loss, params)``.

    Parameters
    ----------
    estimator : MLPClassifier or MLPRegressor
        Fitted, with any hidden ``activation`` (relu, tanh, logistic, identity).

    Returns
    -------
    model : Sequential
        ``Linear`` layers (PyTorch's ``(out, in)`` weight layout) with the hidden
        activation between them. Its outputs are the logits of the estimator's
        output activation: ``softmax(model.forward(params, X))`` equals
        ``predict_proba(X)`` for a multi-class classifier;
        ``expit(model.forward(params, X))`` equals ``predict_proba(X)[:, 1:]`` for a
        binary one (one output) and ``predict_proba(X)`` for a multi-label one;
        for a regressor the outputs are the predictions, ``(N, n_outputs)``.
    loss : Loss
        The data term scikit-learn minimises, on the targets
        :func:`sklearn_targets` returns: ``CrossEntropyLoss()`` (multi-class),
        ``BCEWithLogitsLoss()`` (binary), ``BCEWithLogitsLoss(factor=K)``
        (multi-label: summed over the K labels, mean over samples) and
        ``MSELoss(factor=0.5)`` (regression: half the mean squared error).
    params : ndarray
        ``coefs_`` (transposed) and ``intercepts_``, layer by layer, in their dtype.

    Notes
    -----
    The L2 term (``alpha``, weights only) is not in ``loss``: on N samples its
    diagonal is ``estimator.alpha / N * model.parameter_mask("weight")`` (see the
    module's docstring). An estimator fitted with ``early_stopping=True`` minimised
    its objective on the samples it did not hold out.
    """
    kind = _check_fitted_mlp(estimator)
    coefs, intercepts = estimator.coefs_, estimator.intercepts_
    dtype = np.result_type(*coefs, *intercepts)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"from_sklearn: the estimator's coefficients must be float32 or "
                        f"float64, got {dtype}")
    hidden = _HIDDEN[estimator.activation]
    layers, flat = [], []
    for i, (W, b) in enumerate(zip(coefs, intercepts)):
        if i > 0 and hidden is not None:
            layers.append(hidden())
        layers.append(Linear(W.shape[0], W.shape[1]))
        flat += [np.asarray(W, dtype=dtype).T.reshape(-1), np.asarray(b, dtype=dtype)]
    model = Sequential(*layers, input_shape=(coefs[0].shape[0],))
    params = np.concatenate(flat)
    n_outputs = coefs[-1].shape[1]
    if kind == "regressor":
        loss = MSELoss(factor=0.5)
    elif estimator.out_activation_ == "softmax":
        loss = CrossEntropyLoss()
    else:  # logistic: binary (one output) or multi-label (summed over the labels)
        loss = BCEWithLogitsLoss(factor=float(n_outputs))
    return model, loss, params


def sklearn_targets(estimator, y):
    """Return ``y`` as the targets of the loss :func:`from_sklearn` gives for ``estimator``.

    Class labels become indices into ``classes_`` (multi-class), a column of 0/1
    (binary) or the 0/1 indicator matrix (multi-label); regression targets become
    a float ``(N, n_outputs)`` array.
    """
    kind = _check_fitted_mlp(estimator)
    dtype = np.result_type(*estimator.coefs_)
    y = np.asarray(y)
    n_outputs = estimator.coefs_[-1].shape[1]
    if kind == "regressor":
        return np.asarray(y, dtype=dtype).reshape(len(y), n_outputs)
    if estimator.out_activation_ == "softmax" or (n_outputs == 1 and y.ndim == 1):
        classes = np.asarray(estimator.classes_)
        index = np.searchsorted(classes, y)
        index = np.clip(index, 0, len(classes) - 1)
        unknown = classes[index] != y
        if np.any(unknown):
            raise ValueError(f"sklearn_targets: y holds labels the estimator was not fitted on: "
                             f"{np.unique(y[unknown])[:5].tolist()} (classes_: "
                             f"{classes.tolist()})")
        if estimator.out_activation_ == "softmax":
            return index.astype(np.intp)
        return index.astype(dtype)[:, None]
    indicator = np.asarray(y, dtype=dtype)
    if indicator.shape != (len(y), n_outputs):
        raise ValueError(f"sklearn_targets: a multi-label y must be a 0/1 indicator matrix of "
                         f"shape (n_samples, {n_outputs}), got {indicator.shape}")
    return indicator
