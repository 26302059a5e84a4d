"""Integration tests against the real sandbox (scripts/sandbox).

The session brings the sandbox up and down itself. Set DASK_SPANK_KEEP=1
to leave it running afterwards for inspection.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import sandboxlib as sb  # noqa: E402


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
    name = request.node.name.replace("test_", "").replace("_", "-")[:40]
    # What an earlier run left (a scheduler file with a dead address).
    sb.forget_cluster(name)
    yield name
    sb.cancel_all_user_jobs()
