"""Inference: compiled models, preprocessing transforms, the allocator switch."""
