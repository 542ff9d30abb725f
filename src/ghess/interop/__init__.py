"""Bridges to other libraries (optional extras): PyTorch and scikit-learn."""
