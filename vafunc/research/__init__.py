"""Transforms for research: per-sample gradients, member-batched ensembles, vmap rules."""
