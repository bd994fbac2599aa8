"""Training: the train step (:mod:`~vafunc.training.train`), optimisers (:mod:`~vafunc.training.optim`)
and the distributed engines, DDP and FSDP2 (:mod:`~vafunc.training.distributed`)."""

from vafunc.training import distributed, optim, train  # noqa: F401 - vafunc.training.<module> after import vafunc
