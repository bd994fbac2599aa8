"""Training: the train step (:mod:`~vafunc.training.train`), optimisers (:mod:`~vafunc.training.optim`),
the distributed engines, DDP and FSDP2 (:mod:`~vafunc.training.distributed`), and the segmentation
metrics (:mod:`~vafunc.training.metrics`, public as ``vafunc.metrics``)."""

from vafunc.training import distributed, metrics, optim, train  # noqa: F401 - vafunc.training.<module> after import vafunc
