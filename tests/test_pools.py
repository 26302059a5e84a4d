"""Worker pools (issue 26): one cluster with several kinds of workers. The
sandbox's nodes declare 4 `gpu` generic resources without devices, so a
pool can ask for GPUs on a machine that has none; dask's worker resources
route the tasks that ask for `GPU` to that pool's workers only."""
from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest

import sandboxlib as sb
from test_policy import CONFORMING, submit_bypass

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
    """A CPU pool of 4 (the default pool) and a gpu pool of 2: GPU tasks run
    on the gpu pool's workers only, the others anywhere; a lost gpu worker's
    replacement has the pool's gres and name."""
    ds("up", cluster_name, "--workers", "4", "--pool", "gpu:workers=2,gres=gpu:1,resources=GPU=1",
       "--wait", "100", "--timeout", "240")
    gpu_jobs = worker_jobs(cluster_name, "gpu")
    assert len(gpu_jobs) == 2 and len(worker_jobs(cluster_name)) == 4
    for j in gpu_jobs:
        job = sb.scontrol_job(j)
        assert job["JobName"] == f"dask-worker-{cluster_name}@gpu", job
        assert "gpu:1" in job.get("TresPerNode", "") + job.get("Gres", ""), job
    gpu_workers = {f"{cluster_name}-{j}" for j in gpu_jobs}
    c = sb.client(cluster_name)
    try:
        assert len(sb.worker_names(c)) == 6

        def double(x):
            return 2 * x

        def inc(x):
            return x + 1

        gpu = c.map(double, range(40), resources={"GPU": 1}, pure=False)
        cpu = c.map(inc, range(200), pure=False)
        assert c.gather(gpu) == [2 * i for i in range(40)]
        assert c.gather(cpu) == [i + 1 for i in range(200)]
        # Only the gpu pool's workers offer GPU: every GPU task ran there;
        # the CPU tasks spread over the other workers as well.
        assert where(c, gpu) <= gpu_workers, (where(c, gpu), gpu_workers)
        assert where(c, cpu) - gpu_workers, "no CPU task ran on the default pool"
        del gpu, cpu

        st = json.loads(ds("status", cluster_name, "--json").stdout)
        assert st["pools"]["gpu"]["connected"] == 2, st["pools"]
        assert st["pools"]["default"]["connected"] == 4, st["pools"]
        assert {w["pool"] for w in st["workers"]} == {"default", "gpu"}
        human = ds("status", cluster_name).stdout
        assert "pool gpu: 2 of 2 connected" in human, human
        # The notebook widget (distributed's view of the cluster) has a line per pool.
        view = sb.as_user([str(sb.VENV / "bin" / "python"), "-c",
                           "import sys, dask_spank as d; c = d.SpankCluster(sys.argv[1]); "
                           "print(c._repr_html_()); c.close()", cluster_name], timeout=120).stdout
        assert "Pool gpu: 2 of 2 worker jobs connected" in view, view[-2000:]
        assert "Pool default: 4 of 4 worker jobs connected" in view, view[-2000:]

        # One gpu worker's job is lost: its replacement is of the pool, with
        # its gres and its job name, and GPU tasks run there.
        lost, kept = gpu_jobs
        sb.run(["scancel", lost])
        [new] = sb.wait_until("a replacement gpu worker job",
                              lambda: [j for j in worker_jobs(cluster_name, "gpu") if j not in gpu_jobs] or None,
                              90, 1)
        job = sb.scontrol_job(new)
        assert job["JobName"] == f"dask-worker-{cluster_name}@gpu", job
        assert "gpu:1" in job.get("TresPerNode", "") + job.get("Gres", ""), job
        assert len(worker_jobs(cluster_name)) == 4, "the default pool is left as it was"
        ds("wait", cluster_name, "--pool", "gpu", "--percent", "100", "--timeout", "120")
        again = c.map(double, range(20), resources={"GPU": 1}, pure=False)
        assert c.gather(again) == [2 * i for i in range(20)]
        assert where(c, again) <= {f"{cluster_name}-{new}", f"{cluster_name}-{kept}"}
        status = ds("status", cluster_name).stdout
        assert "keeper, pool gpu: target 2 (fixed)" in status, status
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


def refused_in_one_line(args: list[str], starts: str, key: str) -> None:
    p = ds(*args, check=False) if args[0] == "up" else sb.as_user(args, check=False)
    assert p.returncode != 0, args
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert starts in err, (starts, err)
    assert key in err, (key, err)


def test_pool_maxima_and_the_sites_pools_are_enforced_at_submit(policy, cluster_name):
    """Each of a pool's maxima, and the site's list of pools, refuses `up`
    and a worker job submitted by hand, in one line naming the key; nothing
    is left queued."""
    policy("worker_pools=gpu pool_mem_max=gpu=4G pool_jobs_max=gpu=2 pool_time_max=gpu=4:00:00")
    up = ["up", cluster_name, "--workers", "1", "--pool"]
    refused_in_one_line(up + ["gpu:workers=1,mem=8G,gres=gpu:1,resources=GPU=1"],
                        "dask-spank: --pool gpu:", "pool_mem_max=4G")
    refused_in_one_line(up + ["gpu:workers=3,gres=gpu:1,resources=GPU=1"],
                        "dask-spank: --pool gpu:", "pool_jobs_max=2")
    refused_in_one_line(up + ["gpu:workers=1,time=5:00:00,resources=GPU=1"],
                        "dask-spank: --pool gpu:", "pool_time_max=4:00:00")
    refused_in_one_line(up + ["big:workers=1,mem=8G,resources=MEM=1"],
                        "dask-spank: --pool big:", "worker_pools=gpu")
    by_hand = ["sbatch", "--dask-role=worker", f"--dask-cluster={cluster_name}"]
    refused_in_one_line(by_hand + ["--dask-pool=gpu", "--mem=5G"], "dask-spank: --mem=5G",
                        "pool_mem_max=4G")
    refused_in_one_line(by_hand + ["--dask-pool=big"], "dask-spank: --dask-pool=big",
                        "worker_pools=gpu")
    assert not sb.run(["squeue", "-h", "-u", sb.TEST_USER]).stdout.strip()


def test_a_site_without_gres_through_dask_refuses_a_gpu_pool(policy, cluster_name):
    """`gres=none` (a site that gives dask no GPUs, as CC-IN2P3's does):
    a gpu pool and a GPU asked for by hand are refused naming the key; the
    cluster without GPUs is still fine."""
    policy("gres=none")
    refused_in_one_line(["up", cluster_name, "--workers", "1", "--pool", GPU_POOL],
                        "dask-spank: --pool gpu:", "(gres=none)")
    refused_in_one_line(["sbatch", "--dask-role=worker", f"--dask-cluster={cluster_name}", "--gres=gpu:1"],
                        "dask-spank: --gres=gpu:1 is not allowed", "(gres=none)")
    ds("up", cluster_name, "--workers", "1", "--pool", "big:workers=1,resources=MEM=1", "--dry-run")


# policy keys, --dask-pool, extra sbatch options, the node's reason
BYPASS = [
    ("pool_gres_max=gpu=1", "gpu", ["--gres=gpu:2"], "the job has 2 gpu, more than pool_gres_max=1 for pool gpu"),
    ("gres=none", "gpu", ["--gres=gpu:1"],
     "gres gpu:1 is not allowed: this site gives dask jobs no generic resources (gres=none)"),
    ("worker_pools=gpu", "big", [], "--dask-pool=big is not allowed: worker_pools=gpu"),
    ("pool_mem_max=gpu=4G", "gpu", ["--mem=5G"], "memory 5G exceeds pool_mem_max=4G for pool gpu"),
    ("pool_time_max=gpu=4:00:00", "gpu", ["-t", "5:00:00"], "time limit 5:00:00 exceeds pool_time_max=4:00:00 for pool gpu"),
]


@pytest.mark.parametrize("keys,pool,extra,node_msg", BYPASS, ids=[b[0].split("=")[0] for b in BYPASS])
def test_a_pool_bypassing_the_submit_check_is_refused_on_the_node(policy, cluster_name, keys, pool, extra, node_msg):
    """A worker job of a pool submitted through a private plugstack.conf
    (nothing checked at submit) is refused by the node agent before any
    dask process starts, with the pool's rule in the job's log."""
    policy(keys)
    job = submit_bypass("worker", cluster_name, CONFORMING["worker"] + extra, pool=pool)
    sb.wait_job_gone(job, 60)
    log = (sb.WORK / "log" / f"bypass-{job}.log").read_text()
    assert f"refused by the site policy before any dask process started: {node_msg}" in log, log
    assert "started, pid" not in log
    assert not sb.cluster_processes(cluster_name)


def test_a_pool_job_whose_name_is_not_its_pools_is_refused_on_the_node(cluster_name):
    """The keeper and `status` read a job's pool off its name: a job named
    for the default pool that says `--dask-pool=gpu` (or the reverse) never
    starts dask."""
    for pool, name in (("gpu", f"dask-worker-{cluster_name}"), (None, f"dask-worker-{cluster_name}@gpu")):
        job = submit_bypass("worker", cluster_name, CONFORMING["worker"], pool=pool, job_name=name)
        sb.wait_job_gone(job, 60)
        log = (sb.WORK / "log" / f"bypass-{job}.log").read_text()
        # What the controller shows of the job's free-text fields, after "got".
        assert "job name is not dask-worker-" in log and name + "`" in log.split("got `")[-1], log
        assert "started, pid" not in log
    assert not sb.cluster_processes(cluster_name)


def test_the_guides_pools_file_plans_its_pools(policy, cluster_name):
    """The user guide's `--pools` file, as written, plans each of its pools
    with its options (`up --dry-run`: the sandbox has no bigmem feature),
    at a site that lets the bigmem pool past worker_mem_max; a mistake in
    it is one line naming the file, the pool and the key."""
    policy("pool_mem_max=bigmem=128G")
    guide = (sb.REPO / "docs" / "user.md").read_text()
    [block] = re.findall(r"^ *```toml\n(.*?)^ *```", guide, re.M | re.S)
    f = sb.HOME / "pools.toml"
    f.write_text(textwrap.dedent(block))
    os.chown(f, sb.user().pw_uid, sb.user().pw_gid)
    out = sb.as_user(["bash", "-c", f"cd && dask-spank up {cluster_name} --workers 8 --pools pools.toml --dry-run"]).stdout
    gpu = [l for l in out.splitlines() if "--dask-pool=gpu" in l]
    big = [l for l in out.splitlines() if "--dask-pool=bigmem" in l]
    assert len(gpu) == 1 and len(big) == 1, out
    assert "--gres=gpu:1" in gpu[0] and f"--job-name=dask-worker-{cluster_name}@gpu" in gpu[0], gpu
    assert "--mem=64G" in big[0] and "--constraint=bigmem" in big[0], big
    f.write_text(textwrap.dedent(block).replace("workers = 2", "workrs = 2"))
    p = sb.as_user(["bash", "-c", f"cd && dask-spank up {cluster_name} --pools pools.toml"], check=False)
    assert p.returncode != 0
    assert p.stderr.strip() == ("dask-spank: --pools pools.toml: [gpu]: unknown key 'workrs' (keys: workers, adapt, "
                                "gres, resources, partition, mem, cpus, time, constraint, sbatch, worker_class)"), p.stderr
    assert not worker_jobs(cluster_name)


def test_a_pools_worker_class_runs_its_workers_and_a_wrong_one_is_one_line(cluster_name):
    """`worker_class=MODULE.CLASS`: the pool's workers are of that class
    (imported by the job's own Python), the others plain Workers; a class
    the job's Python cannot import, or one that is no Worker, is one line in
    its job's log and no dask worker."""
    mod = sb.HOME / "tagged_worker.py"
    mod.write_text("from distributed import Worker\n\n\nclass TaggedWorker(Worker):\n    pass\n")
    os.chown(mod, sb.user().pw_uid, sb.user().pw_gid)
    ds("up", cluster_name, "--workers", "1", "--export", f"PYTHONPATH={sb.HOME}",
       "--pool", "tag:workers=1,worker_class=tagged_worker.TaggedWorker",
       "--pool", "missing:workers=1,worker_class=tagged_worker.Missing",
       "--pool", "nanny:workers=1,worker_class=distributed.Nanny")
    # Per pool: the two broken pools' jobs fail, so the whole cluster's
    # 100% cannot be reached.
    ds("wait", cluster_name, "--pool", "default", "--percent", "100", "--timeout", "180")
    ds("wait", cluster_name, "--pool", "tag", "--percent", "100", "--timeout", "120")
    c = sb.client(cluster_name)
    try:
        [tag_job] = worker_jobs(cluster_name, "tag")
        kinds = {names_by_address(c)[a]: k for a, k in c.run(lambda dask_worker: type(dask_worker).__name__).items()}
        assert kinds == {f"{cluster_name}-{tag_job}": "TaggedWorker",
                         f"{cluster_name}-{worker_jobs(cluster_name)[0]}": "Worker"}, kinds
    finally:
        c.close()
    # The pool's jobs fail, and the keeper replaces them: the line is in
    # the logs of its jobs (the worker jobs' log directory).
    logs = Path(sb.scontrol_job(worker_jobs(cluster_name)[0])["StdOut"]).parent
    for name, why in (("tagged_worker.Missing",
                       "cannot import it: AttributeError: module 'tagged_worker' has no attribute 'Missing'"),
                      ("distributed.Nanny", "is not a subclass of distributed.Worker (the node agent is the worker's nanny)")):
        line = f"dask-spank: worker class '{name}' (DASK_SPANK_WORKER_CLASS): "

        def said():
            for f in logs.glob("dask-worker-*.log"):
                text = f.read_text(errors="replace")
                if any(l.startswith(line) and l.endswith(why) for l in text.splitlines()):
                    return text
            return None

        text = sb.wait_until(f"the refusal of {name} in a worker job's log", said, 120, 1)
        assert "Traceback" not in text, text[-3000:]
    st = json.loads(ds("status", cluster_name, "--json").stdout)
    assert st["pools"]["missing"]["connected"] == 0 and st["pools"]["nanny"]["connected"] == 0, st["pools"]
    ds("down", cluster_name)


def test_python_pools_map_onto_the_command():
    """SpankCluster(pools=...) plans the pool's jobs as `up --pool` does
    (job_script: `up --dry-run`, the site's policy applied); a bad pool key
    is a ValueError naming it."""
    program = """
import asyncio
from dask_spank import SpankCluster
from dask_spank.cluster import pool_arg

async def main():
    cluster = SpankCluster("pyplan", asynchronous=True, workers=2,
                           pools={"gpu": dict(workers=1, gres="gpu:1", resources={"GPU": 1}, mem="2G")})
    print(cluster.job_script())
    try:
        SpankCluster("pyplan", asynchronous=True, workers=1, pools={"gpu": dict(gpus=1)})._up_args()
    except ValueError as e:
        print("error:", e)
    print(pool_arg("gpu", dict(workers=2, worker_class="my_pkg.GpuWorker")))

asyncio.run(main())
"""
    out = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", program], timeout=120).stdout
    lines = [l for l in out.splitlines() if l.strip()]
    scheduler, workers, gpu, error, arg = lines
    assert arg == "gpu:workers=2,worker_class=my_pkg.GpuWorker", arg
    assert "--dask-pool" not in workers and "--dask-pool" not in scheduler, out
    for opt in ("--dask-pool=gpu", "--gres=gpu:1", "--mem=2G", "--job-name=dask-worker-pyplan@gpu"):
        assert opt in gpu, (opt, gpu)
    assert error.startswith("error: pools['gpu']: unknown key(s) ['gpus']"), error
    assert "worker_class" in error, error
