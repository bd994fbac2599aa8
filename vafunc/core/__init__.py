"""The kit, its layers and blocks, init, keys, pytrees and the registry."""
