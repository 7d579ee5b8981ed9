"""Fidelity of the caches and of FP8 on the trained tiny FLUX, and the training of that model."""
