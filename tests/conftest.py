import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "vafunc", deadline=None, max_examples=4, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vafunc"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker: N workers x all cores each would oversubscribe the machine
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
