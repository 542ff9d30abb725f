"""The pure-NumPy reference products of ``ghess.testing`` (batched, no cache)."""

from .common import Op


def competitor(s):
    """Return the pure-NumPy reference products of ``ghess.testing`` (batched, no cache)."""
    from ghess import testing

    args = (s.model, s.loss, s.theta, (s.X, s.y), s.v)
    ops = {"numpy GGN product": Op("GGN product", lambda: testing.reference_ggn_matvec(*args)),
           "numpy Hessian product": Op(
               "Hessian product", lambda: testing.reference_hessian_matvec(*args))}
    return {name: entry for name, entry in ops.items() if s.wants(entry.op)}
