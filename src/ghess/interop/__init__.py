"""Bridges to other libraries (optional extras): PyTorch."""
