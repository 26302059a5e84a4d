"""The user guide's Python examples run as written (docs/user.md), as the
test user, on the sandbox: the notebook's first example verbatim, its async
one inside an event loop, and the two ways to connect."""
from __future__ import annotations

import re
import textwrap

import sandboxlib as sb
from test_keeper import ds

GUIDE = (sb.REPO / "docs" / "user.md").read_text()


def section(title: str) -> str:
    start = GUIDE.index(f"\n## {title}\n")
    end = GUIDE.find("\n## ", start + 1)
    return GUIDE[start:end if end > 0 else None]


def python_blocks(title: str) -> list[str]:
    """The ```python blocks of a section, dedented (a block may sit in a
    list item)."""
    return [textwrap.dedent(b) for b in re.findall(r"^ *```python\n(.*?)^ *```", section(title), re.M | re.S)]


def run(program: str, timeout: float = 600):
    return sb.as_user([str(sb.VENV / "bin" / "python"), "-c", program], check=False, timeout=timeout)


def gone(name: str) -> bool:
    return not sb.run(["squeue", "-h", "-u", sb.TEST_USER, "-n",
                       f"dask-scheduler-{name},dask-worker-{name}"]).stdout.strip()


def test_the_notebooks_first_example_runs_as_written():
    first = python_blocks("A notebook")[0]
    assert 'SpankCluster("ana", workers=20' in first, first
    sb.forget_cluster("ana")
    try:
        # As written, and what its bare expressions would show in a notebook.
        r = run(first + "\nprint('link', cluster.dashboard_link)\n")
        assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
        mean = float(r.stdout.split()[0])
        assert abs(mean - 0.5) < 0.01, r.stdout
        assert "token=" in r.stdout, r.stdout
        # cluster.close() is dask-spank down: every job cancelled.
        sb.wait_until("the cluster's jobs gone", lambda: gone("ana"), 120)
    finally:
        ds("down", "ana", check=False)


def test_the_async_example_runs_in_an_event_loop():
    first, async_example = python_blocks("A notebook")[:2]
    assert "async with SpankCluster" in async_example, async_example
    imports = "\n".join(l for l in first.splitlines() if l.startswith(("from ", "import ")))
    program = (f"import asyncio\n{imports}\n\nasync def main():\n{textwrap.indent(async_example, '    ')}"
               "\n    print('done')\n\nasyncio.run(main())\n")
    sb.forget_cluster("ana")
    try:
        r = run(program)
        assert r.returncode == 0 and "done" in r.stdout, (program, r.stdout, r.stderr[-3000:])
        sb.wait_until("the cluster's jobs gone", lambda: gone("ana"), 120)
    finally:
        ds("down", "ana", check=False)


def test_both_ways_to_connect_work():
    package, plain = python_blocks("Connect")[:2]
    assert 'dask_spank.connect("ana")' in package and "Security(" in plain, (package, plain)
    # The guide's home is an example: the test user's own.
    plain = plain.replace("/home/you/.dask-spank", str(sb.HOME / ".dask-spank"))
    sb.forget_cluster("ana")
    ds("up", "ana", "--workers", "1", "--wait", "100", "--timeout", "180")
    try:
        for program in (package, plain):
            r = run(program + "\nprint('sum', client.submit(sum, [1, 2]).result())\nclient.close()\n")
            assert r.returncode == 0 and "sum 3" in r.stdout, (program, r.stdout, r.stderr[-3000:])
    finally:
        ds("down", "ana", check=False)
