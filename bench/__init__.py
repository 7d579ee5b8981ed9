"""Benchmarks, profiles and fidelity measurements: run from the repository root as `python -m bench.<name>`."""
