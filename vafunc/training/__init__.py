"""Training: the train step, optimisers, distributed engines."""
