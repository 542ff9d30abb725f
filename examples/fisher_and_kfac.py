"""The Fisher family on one CNN: exact GGN, empirical and Monte-Carlo Fisher, KFAC and EKFAC.

Run: python examples/fisher_and_kfac.py

A small CNN on random 8x8 images with 10 classes, the pixels unnormalised
(mean 30, standard deviation 10, as raw intensities often are). Prints how far
each approximation is from the exact GGN (relative Frobenius distance, dense
matrices of this small network; the Kronecker ones are block-diagonal, so also
their distance to the GGN's diagonal blocks), then solves the damped Newton system
``(G + d I) x = -g`` by CG with and without KFAC's inverse as the preconditioner,
counting the GGN products: KFAC's input factor captures the pixels' scale, which
is what makes plain CG slow here.
"""

import numpy as np

import ghess


def main():
    """Compare the approximations, then precondition a Newton solve with KFAC."""
    rng = np.random.default_rng(0)
    model = ghess.Sequential(ghess.Conv2d(1, 8, 3, padding=1), ghess.ReLU(),
                             ghess.MaxPool2d(2), ghess.Flatten(), ghess.Linear(8 * 4 * 4, 10),
                             input_shape=(1, 8, 8))
    loss = ghess.CrossEntropyLoss()
    theta = model.init_params(seed=0)
    X = 30.0 + 10.0 * rng.normal(size=(512, 1, 8, 8))
    y = rng.integers(0, 10, size=512)
    data = (X, y)

    G = ghess.GGNLinearOperator(model, loss, theta, data).todense()
    norm = np.linalg.norm(G)
    approximations = {
        "empirical Fisher": ghess.EmpiricalFisherLinearOperator(model, loss, theta, data),
        "MC Fisher, 1 draw": ghess.FisherMCLinearOperator(model, loss, theta, data, seed=0),
        "MC Fisher, 100 draws": ghess.FisherMCLinearOperator(model, loss, theta, data,
                                                             mc_samples=100, seed=0),
        "KFAC (type-2)": ghess.KFACLinearOperator(model, loss, theta, data),
        "EKFAC (type-2)": ghess.EKFACLinearOperator(model, loss, theta, data),
    }
    print(f"{model.n_params} parameters, {len(X)} samples; distance to the exact GGN "
          "(and to its diagonal blocks):")
    blocks = None
    for name, op in approximations.items():
        dense = op.todense()
        line = f"  {name:22s} {np.linalg.norm(dense - G) / norm:.3f}"
        if "KFAC" in name:  # block-diagonal: compare with the GGN's own blocks too
            blocks = np.where(dense != 0, G, 0.0) if blocks is None else blocks
            line += f"  ({np.linalg.norm(dense - blocks) / np.linalg.norm(blocks):.4f})"
        print(line)

    damping = 1e-3
    _, grad = ghess.loss_and_grad(model, loss, theta, data)
    system = ghess.GGNLinearOperator(model, loss, theta, data, damping=damping)
    kfac = approximations["KFAC (type-2)"]
    for label, preconditioner in (("plain CG", None),
                                  ("KFAC-preconditioned CG", kfac.inverse(damping))):
        solve = ghess.InverseLinearOperator(system, rtol=1e-6, maxiter=5000,
                                            preconditioner=preconditioner)
        step = solve @ -grad
        residual = np.linalg.norm(system @ step + grad) / np.linalg.norm(grad)
        print(f"  {label:24s} {solve.info[0]:4d} GGN products, relative residual "
              f"{residual:.1e}")


if __name__ == "__main__":
    main()
