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


#: models whose slow batteries (float64 references, gradients, compile) take 10+ GB each: two at
#: once on two xdist workers can exceed a 24 GB machine, so every test of one of them joins one
#: xdist group and they run one after another on a single worker
GIANT_PARAMS = 300_000_000


def _giant_of(item):
    import vafunc

    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, str) and value in vafunc.list_models() and vafunc.get_entry(value).params > GIANT_PARAMS:
            return value
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is not None and _giant_of(item) is not None:
            # xdist joins every xdist_group name an item carries into one group: drop the
            # item's own (a per-model or per-file group) so all giants share one
            item.own_markers[:] = [m for m in item.own_markers if m.name != "xdist_group"]
            item.add_marker(pytest.mark.xdist_group("giants"))
