"""Three slurmd on one host (slurmd -N n1..n3, one port and one node agent
each): the scheduler on one node, workers on the others, and the loss of a
node in the middle of a computation."""
import os
import signal
import time
from pathlib import Path

import pytest

import sandboxlib as sb


@pytest.fixture(scope="module", autouse=True)
def three_nodes():
    sb.sandbox_up(nodes=3)
    yield
    sb.cancel_all_user_jobs()
    sb.sandbox_up(nodes=1)


def node_pids(name: str) -> list[int]:
    """Every process of one node's jobs: slurmstepd puts SLURMD_NODENAME in
    its own environment and in its tasks' (batch script, dask-spank attach)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURMD_NODENAME={name}".encode() in env:
            out.append(int(d.name))
    return out


def test_one_agent_per_node_and_workers_spread(cluster_name):
    for n in ("n1", "n2", "n3"):
        assert (sb.STATE / "run" / "agent" / f"agent-{n}.sock").exists()
    name = cluster_name
    sb.forget_cluster(name)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}", "-w", "n1")
    w2 = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2", "-w", "n2")
    w3 = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2", "-w", "n3")
    sb.wait_scheduler_file(name)
    c = sb.client(name)
    c.wait_for_workers(4, timeout=120)
    # Each node's agent runs exactly the jobs of its node.
    running = {n: sorted(j["label"] for j in sb.agent_status_of(n) if j["state"] == "running")
               for n in ("n1", "n2", "n3")}
    assert running == {"n1": [sched], "n2": [f"{w2}_1", f"{w2}_2"], "n3": [f"{w3}_1", f"{w3}_2"]}
    c.close()
    sb.as_user(["dask-spank", "down", name])


def computation_with_results_on(c, array: str):
    """Start a sum of 200 slow blocks on the cluster; once the two workers of
    worker array `array` hold some results (which dask must recompute if
    they are lost): the future, the right sum, and those workers."""
    import dask.array as da

    def slow(b):
        import time as t
        t.sleep(0.05)
        return b + 1

    n = 200_000
    x = da.arange(n, chunks=n // 200, dtype="int64")
    fut = c.compute(x.map_blocks(slow).sum())
    time.sleep(1.5)
    assert not fut.done()
    on = [a for a, w in c.scheduler_info()["workers"].items() if w["name"].split("-")[-1].startswith(f"{array}_")]
    assert len(on) == 2
    assert any(c.has_what()[a] for a in on), "the lost node holds results, which dask must recompute"
    return fut, sum(range(1, n + 1)), on


def test_node_loss_mid_computation(cluster_name):
    name = cluster_name
    sb.forget_cluster(name)
    t0 = time.time()
    sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}", "-w", "n1")
    w2 = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2", "-w", "n2")
    # Without requeue, a job of a lost node ends (NODE_FAIL) instead of waiting for the node.
    w3 = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2", "-w", "n3", "--no-requeue")
    sb.wait_scheduler_file(name)
    c = sb.client(name)
    c.wait_for_workers(4, timeout=120)
    fut, want, on_n3 = computation_with_results_on(c, w3)
    kill_node("n3")
    assert int(fut.result(timeout=180)) == want, "dask recomputed the lost tasks elsewhere"
    c.close()
    # Slurm declares n3 down; status reports the dead workers and why.
    def lost():
        st = __import__("json").loads(sb.as_user(["dask-spank", "status", name, "--json"]).stdout)
        rows = {w["job"]: w for w in st["workers"]}
        dead = [rows.get(f"{w3}_{t}") for t in (1, 2)]
        return st if all(r and r["state"] == "failed" for r in dead) else None
    st = sb.wait_until("status to report the lost workers", lost, 90, 1)
    for t in (1, 2):
        row = [w for w in st["workers"] if w["job"] == f"{w3}_{t}"][0]
        assert row["reason"] == "lost: the job ended without a report from n3 (node failure?)", row
    # n2's two workers are still connected: losing n3 did not close their
    # connections (see sb.scheduler_dropped).
    n2 = {w["job"]: w["state"] for w in st["workers"] if w["job"].startswith(f"{w2}_")}
    assert n2 == {f"{w2}_1": "connected", f"{w2}_2": "connected"}, st["workers"]
    # (n3's own workers may say their connection broke: the agent of n3
    # stopped them as their job scripts died, a moment before the power cut
    # reached them; only the n2 workers' connections must have held.)
    assert not [log for log in sb.scheduler_dropped(name, t0) if log.startswith(f"dask-worker-{w2}_")]
    sb.as_user(["dask-spank", "down", name])


def test_a_frozen_node_half_open_is_recomputed_without_waiting_for_dask(cluster_name):
    """A node that stops answering without closing anything (a hung kernel,
    a frozen VM; here every process of n3 stopped with SIGSTOP): its TCP
    connections stay open and its workers never say goodbye, so dask alone
    would keep waiting on them until its worker-ttl (5 minutes). Slurm
    declares the node down and ends its jobs; the keeper sees those jobs
    no longer run while the scheduler still lists their workers, removes
    them from the scheduler, and dask recomputes the lost results at once."""
    name = cluster_name
    sb.forget_cluster(name)
    sb.sandbox_up(nodes=3)
    t0 = time.time()
    sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}", "-w", "n1")
    sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2", "-w", "n2")
    w3 = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2", "-w", "n3", "--no-requeue")
    sb.wait_scheduler_file(name)
    c = sb.client(name)
    frozen = []
    try:
        c.wait_for_workers(4, timeout=120)
        fut, want, on_n3 = computation_with_results_on(c, w3)
        frozen = node_pids("n3") + [int((sb.STATE / "run" / f"{d}-n3.pid").read_text()) for d in ("agent", "slurmd")]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        # Well under dask's worker-ttl (300 s): Slurm's SlurmdTimeout (10 s
        # in the sandbox), the keeper's interval and grace (15 s).
        assert int(fut.result(timeout=150)) == want
        took = time.monotonic() - frozen_at
        assert not set(on_n3) & set(sb.connected_workers(c)), "the frozen workers are gone from the scheduler"
        log = "".join(p.read_text() for p in (sb.WORK / "log").glob("dask-scheduler-*.log")
                      if p.stat().st_mtime >= t0 and f"keeping cluster {name}" in p.read_text())
        assert f"removing from the scheduler the workers of jobs {w3}_1, {w3}_2" in log, log[-3000:]
        print(f"recomputed {took:.0f}s after the node froze")
    finally:
        c.close()
        for pid in frozen:  # a stopped process takes SIGKILL
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sb.cancel_all_user_jobs()
        sb.sandbox_up(nodes=3)  # n3's slurmd and agent again
    sb.wait_until("n3 back", lambda: "idle" in sb.run(["sinfo", "-h", "-n", "n3", "-o", "%t"]).stdout, 90, 1)


def kill_node(name: str) -> None:
    """Lose a node as a power cut would: every process of its jobs, its
    agent and its slurmd, by PID."""
    for pid in node_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # went with another one (its slurmstepd, its cgroup)
    os.kill(int((sb.STATE / "run" / f"agent-{name}.pid").read_text()), signal.SIGKILL)
    os.kill(int((sb.STATE / "run" / f"slurmd-{name}.pid").read_text()), signal.SIGKILL)


def set_nodes(state: str, *nodes: str, check: bool = True) -> None:
    reason = ["reason=test_multinode"] if state == "drain" else []
    sb.run(["scontrol", "update", f"nodename={','.join(nodes)}", f"state={state}", *reason], check=check)


def worker_nodes(name: str) -> dict[str, str]:
    """Running worker jobs of the cluster: job -> node."""
    out = sb.run(["squeue", "-h", "-r", "-t", "R", "-n", f"dask-worker-{name}", "-o", "%i %N"]).stdout
    return dict(l.split() for l in out.splitlines() if l.strip())


def test_the_keeper_replaces_a_worker_lost_with_its_node(cluster_name):
    """`up --workers 2` with a worker on n2, n2 lost: its job ends
    (NODE_FAIL; the user asked for no requeue, so Slurm does not restart
    it), and the scheduler job's keeper submits a replacement, which runs
    on n3; the cluster is back to 2 connected workers."""
    name = cluster_name
    sb.forget_cluster(name)
    sb.sandbox_up(nodes=3)  # the three, whatever an earlier test lost

    def ds(*args):
        return sb.as_user(["dask-spank", *args], env={"SBATCH_NO_REQUEUE": "1"}, timeout=300)

    # Placement by draining: the scheduler and a first worker on n1, the
    # second worker on n2, n3 free for the replacement.
    set_nodes("drain", "n2", "n3")
    try:
        ds("up", name, "--workers", "1", "--wait", "100", "--timeout", "180")
        set_nodes("drain", "n1")
        set_nodes("resume", "n2")
        ds("scale", name, "2")

        def connected():
            return __import__("json").loads(ds("status", name, "--json").stdout)["connected"]
        # The keeper submits the second worker within its interval.
        sb.wait_until("2 running worker jobs", lambda: len(worker_nodes(name)) == 2, 60, 1)
        sb.wait_until("2 connected workers", lambda: connected() == 2, 120, 1)
        on = worker_nodes(name)
        lost = [j for j, n in on.items() if n == "n2"]
        assert len(lost) == 1 and sorted(on.values()) == ["n1", "n2"], on
        set_nodes("resume", "n3")
        kill_node("n2")

        def replaced():
            on = worker_nodes(name)
            return (connected() == 2 and "n3" in on.values() and lost[0] not in on) and on
        on = sb.wait_until("a replacement worker on n3, connected", replaced, 150, 2)
        replacement = [j for j, n in on.items() if n == "n3"][0]
        assert replacement != lost[0], "a new job from the keeper, not a requeue"
        log = "".join(p.read_text() for p in (sb.WORK / "log").glob("dask-scheduler-*.log")
                      if f"keeping cluster {name}" in p.read_text())
        # Twice: for `scale 2`, and for the lost worker.
        assert log.count("target 2, 1 active") >= 2, log[-2000:]
    finally:
        for n in ("n1", "n3"):  # (one may be resumed already: refused, harmless)
            set_nodes("resume", n, check=False)
        sb.cancel_all_user_jobs()
        sb.sandbox_up(nodes=3)  # n2's slurmd and agent again
    sb.wait_until("n2 back", lambda: "idle" in sb.run(["sinfo", "-h", "-n", "n2", "-o", "%t"]).stdout, 60, 1)
