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


#: models whose slow batteries (float64 references, gradients, compile) take 8-16 GB each: two at
#: once on two xdist workers can exceed a 24 GB machine (a worker at 16 GB was OOM-killed while the
#: other held 8), so every test of one of them joins one xdist group and they run one after
#: another on a single worker
GIANT_PARAMS = 100_000_000


def _giant_of(item):
    import vafunc

    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, str) and value in vafunc.list_models() and vafunc.get_entry(value).params > GIANT_PARAMS:
            return value
    return None


#: set on an xdist worker whose grouping is lost (see pytest_collection_finish)
_UNGROUPED: set = set()


def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` an xdist worker marks each grouped test's node id with
    ``@group``, and the controller schedules by that suffix only. If a pytest / pytest-xdist
    pairing stops writing it (pytest 9.2 with xdist 3.8), grouping is lost without a word: every
    model's oracle pair is built on both workers, and giants run side by side. The grouped tests
    then fail with the reason (an exception here would only crash the worker, its text unseen)."""
    if getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        _UNGROUPED.update(
            item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid.rpartition("]")[2])


@pytest.fixture(autouse=True)
def _grouping_holds(request):
    if request.node.nodeid in _UNGROUPED:
        pytest.fail("--dist loadgroup is not grouping: this pytest does not carry the @group that "
                    "pytest-xdist writes into node ids (pytest-dev/pytest-xdist#1386); install the "
                    "pytest that the test extras allow (pip install -e '.[test]')", pytrace=False)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is not None and _giant_of(item) is not None:
            # xdist joins every xdist_group name an item carries into one group: drop the
            # item's own (a per-model or per-file group) so all giants share one
            item.own_markers[:] = [m for m in item.own_markers if m.name != "xdist_group"]
            item.add_marker(pytest.mark.xdist_group("giants"))
