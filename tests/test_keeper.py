"""The scheduler job keeps its cluster (issue 14): the target size the user
recorded (up, scale), walltime successors submitted ahead of time, dask's
adaptive target between a minimum and a maximum; a user's queue limit
(slurmdbd); and two defects around a cluster's start."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time


import sandboxlib as sb


def ds(*args: str, check: bool = True, **kw):
    return sb.as_user(["dask-spank", *args], check=check, **kw)


ALL_STATES = None


def worker_jobs(name: str, states=("PENDING", "RUNNING", "CONFIGURING")) -> list[str]:
    """The cluster's worker jobs in these states (ALL_STATES: every job
    slurmctld still lists, ended ones included)."""
    out = sb.run(["squeue", "-h", "-r", "-t", "all", "-n", f"dask-worker-{name}", "-o", "%i %T"]).stdout.split("\n")
    return [l.split()[0] for l in out if l.strip() and (states is ALL_STATES or l.split()[1] in states)]


def test_the_scheduler_job_keeps_the_target_and_replaces_a_lost_worker(cluster_name):
    ds("up", cluster_name, "--workers", "2", "--wait", "100", "--timeout", "180")
    assert json.loads((sb.cluster_dir(cluster_name) / "target.json").read_text()) == {"workers": 2}
    victim = sorted(worker_jobs(cluster_name))[0]
    sb.run(["scancel", victim])
    sb.wait_until("a replacement worker job", lambda: victim not in worker_jobs(cluster_name)
                  and len(worker_jobs(cluster_name)) == 2, 60, 1)
    ds("wait", cluster_name, "--percent", "100", "--timeout", "120")
    # scale records a target; the keeper submits, then cancels.
    ds("scale", cluster_name, "3")
    sb.wait_until("3 worker jobs", lambda: len(worker_jobs(cluster_name)) == 3, 60, 1)
    ds("scale", cluster_name, "1")
    sb.wait_until("1 worker job", lambda: len(worker_jobs(cluster_name)) == 1, 60, 1)
    st = ds("status", cluster_name).stdout
    assert "keeper: target 1 (fixed)" in st, st
    ds("down", cluster_name)
    assert not worker_jobs(cluster_name)


def test_walltime_successors_keep_the_cluster_at_its_size(policy, cluster_name):
    """4 workers of 1 minute (they retire at 30 s), a computation of about
    two minutes: successors start before their predecessors retire, the
    connected count stays near the target, `status` counts the connected
    workers while they compute, the successors of successors are not
    submitted at once (no chain of jobs), and the result is right."""
    import dask.array as da

    t0 = time.time()
    # Jobs of an earlier run of this test that slurmctld still lists.
    earlier = set(worker_jobs(cluster_name, states=ALL_STATES))
    # A lead close to the lifetime: the keeper caps it at half of it (15 s).
    policy("worker_successor_lead=25s")
    ds("up", cluster_name, "--workers", "4", "--worker-time", "1", "--wait", "100", "--timeout", "180")
    c = sb.client(cluster_name)
    connected, reported, stop = [], [], threading.Event()

    def sample():
        while not stop.is_set():
            connected.append(len(sb.connected_workers(c)))
            st = json.loads(ds("status", cluster_name, "--json").stdout)
            reported.append(sum(w["state"] == "connected" for w in st["workers"]))
            stop.wait(1)

    def slow(b):
        import time as tt
        tt.sleep(0.5)
        return b * 2

    n = 1200
    x = da.arange(n, chunks=1, dtype="int64")
    started = time.monotonic()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        assert int(x.map_blocks(slow).sum().compute()) == n * (n - 1)
    finally:
        stop.set()
        t.join(30)
        c.close()
    elapsed = time.monotonic() - started
    assert elapsed > 75, f"the computation must outlast two worker lifetimes ({elapsed:.0f}s)"
    # Workers left only when they retired (see sb.scheduler_dropped).
    assert not sb.scheduler_dropped(cluster_name, t0)
    seen = set(worker_jobs(cluster_name, states=ALL_STATES)) - earlier
    log = "".join(p.read_text() for p in (sb.WORK / "log").glob("dask-scheduler-*.log")
                  if f"keeping cluster {cluster_name}" in p.read_text())
    # Submissions for retiring workers, and the successor jobs they made:
    # every worker job beyond the first 4.
    assert log.count("retiring for their walltime") >= 2, log[-3000:]
    assert len(seen) - 4 >= 4, (sorted(seen), log[-3000:])
    # A generation every 15 s at most (its lead capped at half its 30 s
    # life), plus the first: a chain would submit one every interval.
    assert len(seen) <= 4 * (elapsed / 15 + 2), (len(seen), elapsed, log[-3000:])
    # Through the handovers: never fewer than 3 of the 4 connected (the
    # first seconds aside, while the first 4 connect).
    assert min(connected[2:]) >= 3, connected
    # status (the keeper's connected.json) saw them while they computed.
    assert max(reported) >= 4 and sorted(reported)[len(reported) // 2] >= 3, reported
    ds("down", cluster_name)


def test_adaptive_sizing_runs_in_the_scheduler_job(cluster_name):
    ds("up", cluster_name, "--adapt", "0:16")
    sb.wait_scheduler_file(cluster_name, 120)
    time.sleep(10)
    assert worker_jobs(cluster_name) == [], "no work, no worker"
    c = sb.client(cluster_name)

    def nap(i):
        import time as tt
        tt.sleep(1)
        return i

    futs = c.map(nap, range(200))
    sb.wait_until("16 worker jobs", lambda: len(worker_jobs(cluster_name)) >= 16, 120, 1)
    assert len(worker_jobs(cluster_name)) <= 16
    assert sum(c.gather(futs)) == sum(range(200)), "no result lost"
    del futs
    sb.wait_until("back to 0 worker jobs", lambda: not worker_jobs(cluster_name), 120, 1)
    c.close()
    ds("down", cluster_name)


def test_a_worker_killed_before_its_scheduler_is_up_restarts(policy, cluster_name):
    """The scheduler job is not running yet: a worker that dies waits for
    it again (restarted), instead of leaving 'scheduler unreachable'."""
    policy("tls=off")
    job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
    pid = sb.wait_until("the worker to run", lambda: next(
        (j["pid"] for j in sb.agent_status() if str(j["job_id"]) == job and j["state"] == "running"), None), 60)
    os.kill(pid, signal.SIGKILL)
    log = sb.WORK / "log" / f"dask-worker-{job}.log"
    sb.wait_until("the worker restarted", lambda: "worker restarted" in log.read_text(), 30)
    assert "the worker leaves" not in log.read_text()
    assert sb.job_states(job) == {job: "RUNNING"}
    sb.run(["scancel", job])


def test_up_wait_says_why_the_scheduler_job_failed(cluster_name):
    """The scheduler job fails before writing anything (here: the node's
    agent is down): `up --wait` ends with the job's reason, from its log."""
    sb.health_check(False)
    pid = sb.agent_pid()
    os.kill(pid, signal.SIGTERM)
    sb.wait_until("the agent to exit", lambda: not os.path.exists(f"/proc/{pid}"), 30)
    try:
        p = ds("up", cluster_name, "--workers", "0", "--wait", "100", "--timeout", "60", check=False)
        assert p.returncode != 0
        assert f"cluster '{cluster_name}' did not start: the scheduler job" in p.stderr, p.stderr
        assert "no dask-spank node agent on n1" in p.stderr, p.stderr
    finally:
        sb.health_check(True)
        sb.sandbox("up")


def connected(name: str) -> int:
    """Workers connected to the cluster's scheduler, as `status` counts them."""
    st = ds("status", name, check=False).stdout
    m = re.search(r"keeper: target \d+ \([^)]*\), (\d+) connected", st)
    return int(m.group(1)) if m else -1


def test_a_user_at_max_submit_jobs_keeps_what_the_limit_allows(cluster_name):
    """The user's association allows 3 jobs (slurmdbd, limits enforced):
    `up --workers 4` does not fail, the keeper takes what the limit allows
    (the scheduler job and 2 workers: Slurm refuses the whole array of 4),
    keeps them, and `status` says why the cluster is short; once the limit
    is raised the cluster grows to 4 without the user doing anything."""
    sb.sandbox_up(nodes=1, accounting=True)

    def max_submit_jobs(n: int) -> None:
        sb.run(["sacctmgr", "-i", "modify", "user", sb.TEST_USER, "set", f"MaxSubmitJobs={n}"])

    try:
        max_submit_jobs(3)
        p = ds("up", cluster_name, "--workers", "4")
        assert "would pass your queue limit" in p.stderr, p.stderr
        sb.wait_until("2 workers connected", lambda: connected(cluster_name) == 2, 180, 1)
        st = ds("status", cluster_name).stdout
        assert re.search(r"short: sbatch refused \d+ of \d+ worker jobs: .*job submit limit", st), st
        # It keeps what it has, and nothing more gets through.
        for _ in range(10):
            assert len(worker_jobs(cluster_name)) == 2
            assert connected(cluster_name) == 2
            time.sleep(2)
        max_submit_jobs(-1)
        sb.wait_until("4 workers connected", lambda: connected(cluster_name) == 4, 240, 1)
        st = ds("status", cluster_name).stdout
        assert "short:" not in st, st
        sched = re.search(r"scheduler job (\d+)", p.stdout).group(1)
        log = (sb.WORK / "log" / f"dask-scheduler-{sched}.log").read_text(errors="replace")
        # One line per decision: 4 refused, 2 taken; the rest refused and
        # retried; then taken.
        assert "submitted 2 worker jobs" in log and "retrying in" in log, log
        ds("down", cluster_name)
        assert not worker_jobs(cluster_name)
    finally:
        sb.cancel_all_user_jobs()
        sb.sandbox_up(nodes=1, accounting=False)


def test_no_worker_job_outlives_its_scheduler_job(cluster_name):
    """The scheduler job of a kept cluster is cancelled while its worker
    jobs still wait in the queue (their partition is down): they are
    cancelled with it, instead of starting later for a scheduler that is
    gone, and the scheduler job's log says so."""
    sb.run(["scontrol", "update", "PartitionName=htc", "State=DOWN"])
    try:
        p = ds("up", cluster_name, "--workers", "2")
        sched = re.search(r"scheduler job (\d+)", p.stdout).group(1)
        sb.wait_until("the keeper to run", lambda: (sb.cluster_dir(cluster_name) / "keeper.json").exists(), 120, 1)
        assert len(worker_jobs(cluster_name, states=("PENDING",))) == 2
        sb.run(["scancel", sched])
        sb.wait_until("the worker jobs to be cancelled", lambda: not worker_jobs(cluster_name), 30, 0.5)
        log = sb.WORK / "log" / f"dask-scheduler-{sched}.log"
        sb.wait_until("the scheduler job's last line", lambda: "worker jobs were cancelled" in log.read_text(), 30)
    finally:
        sb.run(["scontrol", "update", "PartitionName=htc", "State=UP"])
