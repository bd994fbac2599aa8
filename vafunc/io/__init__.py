"""Weights in and out: state_dict conversion and the checkpoint hub."""
