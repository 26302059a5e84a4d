"""Worker pools (issue 26): one cluster with several kinds of workers. The
sandbox's nodes declare 4 `gpu` generic resources without devices, so a
pool can ask for GPUs on a machine that has none; dask's worker resources
route the tasks that ask for `GPU` to that pool's workers only."""
from __future__ import annotations

import json

import sandboxlib as sb

GPU_POOL = "gpu:workers=1,gres=gpu:1,resources=GPU=1"


def ds(*args: str, check: bool = True, **kw):
    return sb.as_user(["dask-spank", *args], check=check, **kw)


def worker_jobs(name: str, pool: str | None = None) -> list[str]:
    """A pool's queued or running worker jobs, by their job name."""
    job_name = f"dask-worker-{name}" + (f"@{pool}" if pool else "")
    out = sb.run(["squeue", "-h", "-r", "-n", job_name, "-o", "%i %T"]).stdout.splitlines()
    return sorted(l.split()[0] for l in out if l.strip() and l.split()[1] in ("PENDING", "RUNNING", "CONFIGURING"))


def names_by_address(c) -> dict[str, str]:
    return {a: w["name"] for a, w in c.scheduler_info(n_workers=-1)["workers"].items()}


def where(c, futures) -> set[str]:
    """The names of the workers holding these futures' results."""
    names = names_by_address(c)
    return {names[a] for addrs in c.who_has(futures).values() for a in addrs}


def test_gpu_tasks_run_on_the_gpu_pool_and_its_lost_worker_is_replaced_with_its_options(cluster_name):
    ds("up", cluster_name, "--workers", "2", "--pool", GPU_POOL, "--wait", "100", "--timeout", "180")
    [gpu_job] = worker_jobs(cluster_name, "gpu")
    assert len(worker_jobs(cluster_name)) == 2
    job = sb.scontrol_job(gpu_job)
    assert job["JobName"] == f"dask-worker-{cluster_name}@gpu", job
    assert "gpu:1" in job.get("TresPerNode", "") + job.get("Gres", ""), job
    c = sb.client(cluster_name)
    try:
        assert len(sb.worker_names(c)) == 3

        def double(x):
            return 2 * x

        def inc(x):
            return x + 1

        gpu = c.map(double, range(20), resources={"GPU": 1}, pure=False)
        cpu = c.map(inc, range(40), pure=False)
        assert c.gather(gpu) == [2 * i for i in range(20)]
        assert c.gather(cpu) == [i + 1 for i in range(40)]
        # Only the gpu pool's worker offers GPU: every GPU task ran there.
        assert where(c, gpu) == {f"{cluster_name}-{gpu_job}"}
        del gpu, cpu

        st = json.loads(ds("status", cluster_name, "--json").stdout)
        assert st["pools"]["gpu"]["connected"] == 1, st["pools"]
        assert st["pools"]["default"]["connected"] == 2, st["pools"]
        assert {w["pool"] for w in st["workers"]} == {"default", "gpu"}
        human = ds("status", cluster_name).stdout
        assert "pool gpu: 1 of 1 connected" in human, human
        # The notebook widget (distributed's view of the cluster) has a line per pool.
        view = sb.as_user([str(sb.VENV / "bin" / "python"), "-c",
                           "import sys, dask_spank as d; c = d.SpankCluster(sys.argv[1]); "
                           "print(c._repr_html_()); c.close()", cluster_name], timeout=120).stdout
        assert "Pool gpu: 1 of 1 worker jobs connected" in view, view[-2000:]
        assert "Pool default: 2 of 2 worker jobs connected" in view, view[-2000:]

        # The gpu worker's job is lost: its replacement is of the pool, with
        # its gres and its job name, and GPU tasks run there.
        sb.run(["scancel", gpu_job])
        [new] = sb.wait_until("a replacement gpu worker job",
                              lambda: [j for j in worker_jobs(cluster_name, "gpu") if j != gpu_job] or None, 90, 1)
        job = sb.scontrol_job(new)
        assert job["JobName"] == f"dask-worker-{cluster_name}@gpu", job
        assert "gpu:1" in job.get("TresPerNode", "") + job.get("Gres", ""), job
        assert len(worker_jobs(cluster_name)) == 2, "the default pool is left as it was"
        ds("wait", cluster_name, "--pool", "gpu", "--percent", "100", "--timeout", "120")
        again = c.map(double, range(5), resources={"GPU": 1}, pure=False)
        assert c.gather(again) == [2 * i for i in range(5)]
        assert where(c, again) == {f"{cluster_name}-{new}"}
        status = ds("status", cluster_name).stdout
        assert "keeper, pool gpu: target 1 (fixed)" in status, status
    finally:
        c.close()
    ds("down", cluster_name)
    assert not worker_jobs(cluster_name) and not worker_jobs(cluster_name, "gpu")


def test_gpu_tasks_grow_the_gpu_pool_only_and_cpu_tasks_the_default_pool_only(cluster_name):
    """Both pools adaptive: a burst of GPU tasks grows the gpu pool to its
    maximum and not the default pool, which stays at its minimum; the gpu
    pool shrinks back once they are done; a burst of CPU tasks then grows
    the default pool and not the gpu pool."""
    ds("up", cluster_name, "--adapt", "1:3", "--pool", "gpu:adapt=0:2,gres=gpu:1,resources=GPU=1")
    sb.wait_until("the default pool's first worker", lambda: len(worker_jobs(cluster_name)) == 1, 120, 1)
    ds("wait", cluster_name, "--percent", "100", "--timeout", "120")
    assert worker_jobs(cluster_name, "gpu") == [], "no GPU task, no gpu worker"
    c = sb.client(cluster_name)
    default_sizes = []
    try:
        def nap(i):
            import time as tt
            tt.sleep(1)
            return i

        futs = c.map(nap, range(40), resources={"GPU": 1}, pure=False)

        def two_gpu_jobs():
            default_sizes.append(len(worker_jobs(cluster_name)))
            return len(worker_jobs(cluster_name, "gpu")) == 2

        sb.wait_until("2 gpu worker jobs", two_gpu_jobs, 120, 1)
        assert sum(c.gather(futs)) == sum(range(40))
        assert len(worker_jobs(cluster_name, "gpu")) <= 2
        default_sizes.append(len(worker_jobs(cluster_name)))
        assert set(default_sizes) == {1}, f"GPU tasks grew the default pool: {default_sizes}"
        del futs
        sb.wait_until("the gpu pool back to 0", lambda: not worker_jobs(cluster_name, "gpu"), 120, 1)

        futs = c.map(nap, range(200), pure=False)
        gpu_sizes = []

        def three_default_jobs():
            gpu_sizes.append(len(worker_jobs(cluster_name, "gpu")))
            return len(worker_jobs(cluster_name)) == 3

        sb.wait_until("3 default worker jobs", three_default_jobs, 120, 1)
        assert sum(c.gather(futs)) == sum(range(200))
        gpu_sizes.append(len(worker_jobs(cluster_name, "gpu")))
        assert set(gpu_sizes) == {0}, f"CPU tasks grew the gpu pool: {gpu_sizes}"
        del futs
    finally:
        c.close()
    ds("down", cluster_name)


def test_a_pool_over_the_sites_maximum_is_refused_in_one_line(policy, cluster_name):
    policy("pool_gres_max=gpu=1")
    p = ds("up", cluster_name, "--workers", "1", "--pool", "gpu:workers=1,gres=gpu:2,resources=GPU=1",
           check=False)
    assert p.returncode != 0
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dask-spank: --pool gpu:"), err
    assert "pool_gres_max=1" in err, err
    # Nothing was submitted.
    assert not sb.run(["squeue", "-h", "-n", f"dask-scheduler-{cluster_name}"]).stdout.strip()
    # A bad pool is one line naming it too, before anything else.
    p = ds("up", cluster_name, "--pool", "gpu:workrs=1", check=False)
    assert p.returncode != 0
    assert p.stderr.strip().startswith("dask-spank: --pool gpu:workrs=1: unknown key 'workrs'"), p.stderr


def test_python_pools_map_onto_the_command():
    """SpankCluster(pools=...) plans the pool's jobs as `up --pool` does
    (job_script: `up --dry-run`, the site's policy applied); a bad pool key
    is a ValueError naming it."""
    program = """
import asyncio
from dask_spank import SpankCluster

async def main():
    cluster = SpankCluster("pyplan", asynchronous=True, workers=2,
                           pools={"gpu": dict(workers=1, gres="gpu:1", resources={"GPU": 1}, mem="2G")})
    print(cluster.job_script())
    try:
        SpankCluster("pyplan", asynchronous=True, workers=1, pools={"gpu": dict(gpus=1)})._up_args()
    except ValueError as e:
        print("error:", e)

asyncio.run(main())
"""
    out = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", program], timeout=120).stdout
    lines = [l for l in out.splitlines() if l.strip()]
    scheduler, workers, gpu, error = lines
    assert "--dask-pool" not in workers and "--dask-pool" not in scheduler, out
    for opt in ("--dask-pool=gpu", "--gres=gpu:1", "--mem=2G", "--job-name=dask-worker-pyplan@gpu"):
        assert opt in gpu, (opt, gpu)
    assert error.startswith("error: pools['gpu']: unknown key(s) ['gpus']"), error
