"""Notebook-first (issue 25): SpankCluster as dask users expect it, async
included, with clear errors at once and the kernel's own Python."""
from __future__ import annotations

import os
import re
import time

import sandboxlib as sb
from test_keeper import ds, worker_jobs


def as_user_python(program: str, *args: str, python: str | None = None, timeout: float = 600):
    return sb.as_user([python or str(sb.VENV / "bin" / "python"), "-c", program, *args], check=False,
                      timeout=timeout)


ASYNC = """
import asyncio, sys
from distributed import Client
from dask_spank import SpankCluster

async def main(name):
    async with SpankCluster(name, workers=2, worker_mem="1G", wait=100, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            assert await client.submit(sum, [1, 2]) == 3
            await client.restart()
            await client.wait_for_workers(2)
            assert await client.submit(sum, [3, 4]) == 7
            await cluster.scale(3)
            await client.wait_for_workers(3, timeout=120)
            await cluster.adapt(0, 1)
            print("link", cluster.dashboard_link)
    print("closed")

asyncio.run(main(sys.argv[1]))
"""


def test_an_async_cluster_computes_restarts_scales_adapts_and_closes(cluster_name):
    r = as_user_python(ASYNC, cluster_name)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    assert "closed" in r.stdout and "token=" in r.stdout, r.stdout
    sb.wait_until("the cluster gone", lambda: not sb.run(["squeue", "-h", "-n",
        f"dask-scheduler-{cluster_name},dask-worker-{cluster_name}"]).stdout.strip(), 60)


ERRORS = """
import sys, time
from dask_spank import SpankCluster
from dask_spank.cluster import DaskSpankError
name = sys.argv[1]
t0 = time.monotonic()
try:
    SpankCluster(name + "-typo", timeout=600)
except DaskSpankError as e:
    print("unknown:", round(time.monotonic() - t0, 1), e)
try:
    SpankCluster(name, worker_mem="3G")
except TypeError as e:
    print("sizing:", e)
try:
    SpankCluster()
except TypeError as e:
    print("no name:", e)
c = SpankCluster(name, workers=1, wait=100)
try:
    SpankCluster(name, workers=1)
except DaskSpankError as e:
    print("in use:", e)
again = SpankCluster(name, workers=2, reuse=True, timeout=1)
print("reused:", again.shutdown_on_close)
again.close()
c.close()
try:
    # Its scheduler job cannot start within the timeout: it waits an hour.
    SpankCluster(name + "-slow", workers=1, timeout=3, scheduler_sbatch=["--begin=now+3600"])
except TimeoutError as e:
    print("slow:", e, *getattr(e, "__notes__", []))
print("done")
"""


def test_errors_come_at_once_and_a_cluster_can_be_reused(cluster_name):
    """...and a cluster whose start fails (no scheduler within the timeout)
    is shut down, not left to idle until its time limit."""
    try:
        r = as_user_python(ERRORS, cluster_name)
    finally:
        slow = ds("status", cluster_name + "-slow", "--json", check=False).stdout
        ds("down", cluster_name + "-slow", check=False)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    out = r.stdout
    unknown = next(l for l in out.splitlines() if l.startswith("unknown:"))
    assert float(unknown.split()[1]) < 10 and "unknown cluster" in unknown, unknown
    assert "sizing: SpankCluster(" in out and "pass workers=N to start it" in out, out
    assert "no name: SpankCluster() needs the name of a running cluster" in out and "workers=N" in out, out
    assert "in use:" in out and "reuse=True" in out, out
    assert "reused: False" in out and "done" in out, out
    failed = next(l for l in out.splitlines() if l.startswith("slow:"))
    assert "has no scheduler after 3s" in failed and "was shut down" in failed, failed
    # `down` had cancelled its jobs before the error reached the user.
    assert '"RUNNING"' not in slow and '"PENDING"' not in slow, slow


KERNEL = """
import os, sys
from distributed import Client
from dask_spank import SpankCluster
with SpankCluster(sys.argv[1], workers=1, wait=100) as cluster, Client(cluster) as client:
    print("workers run", sorted(set(client.run(lambda: sys.executable).values())))
    print("kernel is", sys.executable)
"""


def test_workers_run_the_kernels_own_python(cluster_name):
    """A kernel in a venv of its own: the workers run that venv's Python."""
    kernel = sb.WORK / "venv-kernel"
    sb.as_user(["rm", "-rf", str(kernel)])
    sb.as_user(["/usr/bin/python3", "-m", "venv", "--without-pip", str(kernel)])
    site = next((kernel / "lib").glob("python3*/site-packages"))
    venv_site = next((sb.VENV / "lib").glob("python3*/site-packages"))
    # distributed and dask_spank from the sandbox's venv, through a .pth.
    sb.as_user(["/usr/bin/python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                str(site / "sandbox.pth"), str(venv_site)])
    r = as_user_python(KERNEL, cluster_name, python=str(kernel / "bin" / "python"))
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    assert f"workers run ['{kernel}/bin/python']" in r.stdout, r.stdout
    log = "".join(p.read_text(errors="replace") for p in (sb.WORK / "log").glob("dask-worker-*.log")
                  if f"{cluster_name}" in p.read_text(errors="replace"))
    assert f"dask-spank: dask-worker runs {kernel}/bin/python" in log, log[-2000:]


DEFAULTS = """
import sys
from dask_spank import SpankCluster
with SpankCluster(sys.argv[1], workers=1) as cluster:
    print("jobs", cluster.status_jobs()["workers"][0]["job"])
"""


def test_personal_defaults_come_from_dasks_configuration(cluster_name):
    """A `dask-spank:` section of dask's configuration (here as its
    environment variable) sizes a new cluster's workers."""
    r = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", DEFAULTS, cluster_name], check=False, timeout=600,
                   env={"DASK_DASK_SPANK__WORKER_MEM": "1500M"})
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    job = r.stdout.split("jobs", 1)[1].split()[0]
    assert sb.scontrol_job(job)["MinMemoryNode"] == "1500M", sb.scontrol_job(job)


def notebook(name: str):
    """The async notebook of the user guide, as cells."""
    import nbformat

    cells = [
        "from distributed import Client\nfrom dask_spank import SpankCluster",
        f"cluster = await SpankCluster({name!r}, workers=2, wait=100, asynchronous=True)",
        "client = await Client(cluster, asynchronous=True)\nassert await client.submit(sum, [1, 2]) == 3",
        "await client.restart()\nawait client.wait_for_workers(2)\n"
        "assert await client.submit(sum, [3, 4]) == 7\nassert len(await client.nthreads()) == 2",
        "await cluster.scale(3)\nawait client.wait_for_workers(3, timeout=120)",
        "await cluster.adapt(0, 1)",
        "print(cluster.dashboard_link)\nawait client.close()\nawait cluster.close()\nprint('closed')",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


RUN_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3").execute()
print("".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])))
"""


def test_the_async_notebook_runs_in_a_real_kernel(cluster_name):
    """nbclient runs the notebook in an IPython kernel (its event loop, top
    level awaits): start, compute, client.restart(), compute with the same
    workers, scale, adapt, close."""
    import nbformat

    path = sb.WORK / f"{cluster_name}.ipynb"
    nbformat.write(notebook(cluster_name), str(path))
    os.chown(path, sb.user().pw_uid, sb.user().pw_gid)
    r = as_user_python(RUN_NOTEBOOK, str(path))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "closed" in r.stdout and "token=" in r.stdout, r.stdout
    sb.wait_until("the cluster gone", lambda: not sb.run(["squeue", "-h", "-n",
        f"dask-scheduler-{cluster_name},dask-worker-{cluster_name}"]).stdout.strip(), 60)


IDLE = """
import sys, time
import dask.bag as db
from dask_spank import connect
client = connect(sys.argv[1])
x = client.persist(db.from_sequence(range(1000), npartitions=2).sum())
print("persisted", flush=True)
time.sleep(float(sys.argv[2]))
print("still there", x.compute(), flush=True)
client.close()
"""


def test_the_idle_timeout_waits_for_clients_too(policy, cluster_name):
    """idle_timeout=20s: a client holding persisted data but running
    nothing for 40 s keeps the cluster (dask's own idle timeout ignored
    clients, and the data was lost); once it leaves, the cluster ends after
    the idle time."""
    policy("idle_timeout=20s")
    ds("up", cluster_name, "--workers", "1", "--wait", "100", "--timeout", "180")
    r = as_user_python(IDLE, cluster_name, "40")
    assert r.returncode == 0 and "still there 499500" in r.stdout, (r.stdout, r.stderr[-3000:])
    t0 = time.monotonic()
    sb.wait_until("the scheduler to end by its idle timeout", lambda: not sb.run(
        ["squeue", "-h", "-n", f"dask-scheduler-{cluster_name}"]).stdout.strip(), 120, 1)
    assert time.monotonic() - t0 > 15, "it waited for the idle time after the client left"


NO_CLIENT = """
import sys, time
from distributed import fire_and_forget
from dask_spank import connect
client = connect(sys.argv[1])
assert client.submit(sum, [1, 2]).result() == 3
# Keeps the worker's one thread busy long after the client left.
fire_and_forget(client.submit(time.sleep, 600, pure=False))
time.sleep(float(sys.argv[2]))
print("still there", len(client.scheduler_info()["workers"]), flush=True)
client.close()
"""


def test_the_no_client_timeout_ends_a_busy_cluster_nobody_holds(policy, cluster_name):
    """no_client_timeout=20s: a client connected for 40 s keeps the
    cluster; once it leaves, the scheduler ends after 20 s although a task
    still runs (idle_timeout alone would wait for it), and its log says why."""
    policy("no_client_timeout=20s")
    up = ds("up", cluster_name, "--workers", "1", "--wait", "100", "--timeout", "180").stdout
    sched = re.search(r"scheduler job (\d+)", up).group(1)
    r = as_user_python(NO_CLIENT, cluster_name, "40")
    assert r.returncode == 0 and "still there 1" in r.stdout, (r.stdout, r.stderr[-3000:])
    t0 = time.monotonic()
    sb.wait_until("the scheduler to end by its no-client timeout", lambda: not sb.run(
        ["squeue", "-h", "-n", f"dask-scheduler-{cluster_name}"]).stdout.strip(), 120, 1)
    assert time.monotonic() - t0 > 15, "it waited for the no-client time after the client left"
    log = (sb.WORK / "log" / f"dask-scheduler-{sched}.log").read_text(errors="replace")
    assert "no client for 20s (the site's no_client_timeout)" in log, log[-3000:]
    sb.wait_until("the workers to follow", lambda: not sb.run(
        ["squeue", "-h", "-n", f"dask-worker-{cluster_name}"]).stdout.strip(), 120, 1)


OPTIONS = """
import os, sys
from distributed import Client
from dask_spank import SpankCluster
name = sys.argv[1]
cluster = SpankCluster(name, workers=1, wait=100, resources={"GPU": 1}, env_vars={"ANA_MODE": "a,b"},
                       local_directory=f"/tmp/ana-scratch-{os.getuid()}", worker_sbatch=["--comment=ana-pool"])
client = Client(cluster)
print("resources", client.run(lambda dask_worker: dask_worker.state.total_resources))
print("mode", set(client.run(lambda: os.environ.get("ANA_MODE")).values()))
print("dir", set(v.startswith(f"/tmp/ana-scratch-{os.getuid()}") for v in client.run(lambda dask_worker: dask_worker.local_directory).values()))
assert client.submit(lambda: 1, resources={"GPU": 1}).result(timeout=60) == 1
client.close()
print("jobs", " ".join(r["job"] for r in cluster.status_jobs()["workers"]))
"""


def test_sbatch_and_dask_worker_options_from_python_are_kept(cluster_name):
    """From Python: a worker resource, a variable with a comma, a local
    directory and an extra sbatch option reach the workers; the keeper's
    replacement of a cancelled worker has them too."""
    r = as_user_python(OPTIONS, cluster_name)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    assert "{'GPU': 1}" in r.stdout and "mode {'a,b'}" in r.stdout and "dir {True}" in r.stdout, r.stdout
    first = r.stdout.split("jobs", 1)[1].split()[0]
    assert sb.scontrol_job(first)["Comment"] == "ana-pool"
    sb.run(["scancel", first])
    new = sb.wait_until("a replacement", lambda: next(iter(set(worker_jobs(cluster_name)) - {first}), None), 90, 1)
    assert sb.scontrol_job(new)["Comment"] == "ana-pool", sb.scontrol_job(new)
    env = open(f"/proc/{sb.wait_until('its worker', lambda: next((p['pid'] for p in sb.dask_processes() if f'{cluster_name}-{new}' in ' '.join(p['args'])), None), 90)}/environ", "rb").read()
    assert b'DASK_DISTRIBUTED__WORKER__RESOURCES={"GPU": 1}' in env and b"ANA_MODE=a,b" in env
    ds("down", cluster_name)
