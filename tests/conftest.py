"""Integration tests against the real sandbox (scripts/sandbox).

The session brings the sandbox up and down itself. Set DASK_SPANK_KEEP=1
to leave it running afterwards for inspection.
"""
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import sandboxlib as sb  # noqa: E402
from hangfs_fixture import hung_fs  # noqa: E402,F401  (a fixture for every test module)


@pytest.fixture(scope="session", autouse=True)
def sandbox():
    try:
        sb.sandbox("up")
    except Exception:
        # Stop whatever a half-done `up` started (munged, say), by PID.
        sb.sandbox("down")
        raise
    try:
        yield sb
    finally:
        try:
            sb.cancel_all_user_jobs()
        finally:
            if not os.environ.get("DASK_SPANK_KEEP"):
                sb.sandbox("down")


@pytest.fixture
def policy():
    """Run one test with extra plugstack.conf policy keys: call it with
    them ("worker_start=forkserver"); the default policy is back afterwards.
    List it before cluster_name, so that the test's jobs are cancelled
    first."""
    yield sb.set_policy
    sb.set_policy("")


@pytest.fixture
def cluster_name(request):
    """A cluster name unique to the test; its jobs are cancelled afterwards."""
    # A parametrised test's [param] too: a cluster name is [a-z0-9-].
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.replace("test_", "").lower())[:40].strip("-")
    # What an earlier run left (a scheduler file with a dead address).
    sb.forget_cluster(name)
    yield name
    sb.cancel_all_user_jobs()


# How many last lines of each log a failed test's report shows.
LOG_TAIL = 30
_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the tails of the logs written while
    it ran (the jobs' logs, the agents', slurmd's and slurmctld's): a
    failure in CI, whose sandbox is gone afterwards, can be understood from
    the report alone."""
    if call.when == "setup":
        item.stash[_STARTED] = time.time()
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or not report.failed:
        return
    started = item.stash.get(_STARTED, time.time()) - 1
    for d in (sb.WORK / "log", sb.STATE / "log"):
        try:
            logs = sorted((p for p in d.iterdir() if p.is_file() and p.stat().st_mtime >= started),
                          key=lambda p: p.stat().st_mtime)
        except OSError:
            continue
        for p in logs:
            try:
                tail = p.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            except OSError as e:
                tail = [f"(unreadable: {e})"]
            report.sections.append((f"log {p.relative_to(sb.STATE)} (last {LOG_TAIL} lines)", "\n".join(tail)))

