import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "vafunc",
    deadline=None,
    max_examples=4,
    derandomize=True,
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
#: models whose slow tests need the machine to themselves (vit_h_14's gradient check peaks at
#: 19 GB): the other workers wait while one runs (see pytest_runtest_protocol)
EXCLUSIVE_PARAMS = 300_000_000


def _model_of(item):
    import vafunc

    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, str) and value in vafunc.list_models():
            return value
    return None


def _params_of(item) -> int:
    import vafunc

    name = _model_of(item)
    return 0 if name is None else vafunc.get_entry(name).params


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
            item.nodeid
            for item in session.items
            if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid.rpartition("]")[2]
        )


@pytest.fixture(autouse=True)
def _grouping_holds(request):
    if request.node.nodeid in _UNGROUPED:
        pytest.fail(
            "--dist loadgroup is not grouping: this pytest does not carry the @group that "
            "pytest-xdist writes into node ids (pytest-dev/pytest-xdist#1386); install the "
            "pytest that the test extras allow (pip install -e '.[test]')",
            pytrace=False,
        )


def _plain_id(item) -> str | None:
    """The node id without xdist's ``@group`` suffix (None for no item)."""
    return None if item is None else item.nodeid.partition("@")[0]


#: node ids of the tests that run alone, and of all giants' tests (filled at collection, on every
#: worker alike)
_EXCLUSIVE: set = set()
_GIANT: set = set()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is None:
            continue
        params = _params_of(item)
        if params > GIANT_PARAMS:
            # xdist joins every xdist_group name an item carries into one group: drop the
            # item's own (a per-model or per-file group) so all giants share one
            item.own_markers[:] = [m for m in item.own_markers if m.name != "xdist_group"]
            item.add_marker(pytest.mark.xdist_group("giants"))
            _GIANT.add(_plain_id(item))
        if params > EXCLUSIVE_PARAMS:
            _EXCLUSIVE.add(_plain_id(item))


class _Gate:
    """A readers-writer lock between the xdist workers of one run, on two lock files: every test
    holds ``main`` shared, a test in _EXCLUSIVE holds it exclusively. ``turn`` gives the
    exclusive side priority: a waiting exclusive test holds it, and it stops new shared entries."""

    def __init__(self, uid: str):
        import tempfile

        base = os.path.join(tempfile.gettempdir(), f"vafunc-tests-{uid}")
        self.turn = open(base + ".turn", "a+")
        self.main = open(base + ".main", "a+")
        self.held = None

    def enter(self, exclusive: bool) -> None:
        import fcntl

        want = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if self.held == want:  # an exclusive test right after another keeps the machine
            return
        fcntl.flock(self.turn, want)
        fcntl.flock(self.main, want)
        if not exclusive:
            fcntl.flock(self.turn, fcntl.LOCK_UN)
        self.held = want

    def leave(self) -> None:
        import fcntl

        fcntl.flock(self.main, fcntl.LOCK_UN)
        fcntl.flock(self.turn, fcntl.LOCK_UN)
        self.held = None


_GATE: list = []


def _return_freed_memory() -> None:
    """Collect, then hand the freed heap back to the system. glibc keeps freed blocks below its
    mmap threshold (which grows to 32 MB as large blocks are freed) in the heap: a worker that ran
    vit_l_16's tests held 16.8 GB, 14.8 GB of it free heap, while the other worker needed memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With exclusive tests in the run (``-m slow`` on xdist workers), each test runs under the gate;
    an exclusive one keeps the machine through the next test if that is exclusive too, and on
    leaving a run of them the test module's ``release_caches()`` (if it has one) frees what they
    left cached, before the other workers resume."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not _EXCLUSIVE or uid is None:
        try:
            return (yield)
        finally:
            if _plain_id(item) in _GIANT:
                _return_freed_memory()
    if not _GATE:
        _GATE.append(_Gate(uid))
    gate = _GATE[0]
    exclusive = _plain_id(item) in _EXCLUSIVE
    next_exclusive = _plain_id(nextitem) in _EXCLUSIVE
    if gate.held is None and item.get_closest_marker("slow") is not None:
        # a worker about to wait for (or start) a test hands back the heap its last one freed: a
        # worker holding 4 GB of it beside vit_h_14's 19.7 GB gradient check was one too many
        _return_freed_memory()
    gate.enter(exclusive)
    try:
        return (yield)
    finally:
        if exclusive and not next_exclusive:
            release = getattr(item.module, "release_caches", None)
            if release is not None:
                release()
        if _plain_id(item) in _GIANT:
            _return_freed_memory()
        if not (exclusive and next_exclusive):
            gate.leave()
