"""Restarting and upgrading the node agent loses nothing (issue 16).

The dask processes outlive the agent (they are not its children's
children: no parent-death signal), the state directory names them by pid
and start time, and each job's attach process hands the job over to the
new agent, which adopts them. Stopping the agent for good stops them after
agent_restart_grace, from the jobs themselves, which then fail with the
reason; `dask-node-agent stop-jobs` stops them at once.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import agentproto
import sandboxlib as sb
from test_nanny import forkserver_processes, mine, start, stubborn_worker, worker_log

AGENT = str(sb.BIN / "dask-node-agent")


def worker_pids(c) -> dict[str, int]:
    """dask worker name -> pid (of the workers that answer)."""
    names = {a: w["name"] for a, w in c.scheduler_info()["workers"].items()}
    pids = c.run(os.getpid, on_error="ignore")
    return {names[a]: pid for a, pid in pids.items() if a in names and isinstance(pid, int)}



def slow_sum(c, n: int = 300_000):
    import dask.array as da

    def slow(b):
        import time as t
        t.sleep(0.05)
        return b + 1

    x = da.arange(n, chunks=n // 150, dtype="int64")
    return c.compute(x.map_blocks(slow).sum()), sum(range(1, n + 1))


def stop_agent(sig) -> None:
    pid = sb.agent_pid()
    os.kill(pid, sig)
    sb.wait_until("the agent to exit", lambda: not os.path.exists(f"/proc/{pid}")
                  or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z", 30)


def payload_with_agent(agent: str) -> Path:
    """A payload (as `scripts/sandbox up` takes with DASK_SPANK_PAYLOAD) of
    the installed plugin and command and `agent`: `sandbox up` alone would
    install the build tree's agent over any other."""
    d = sb.STATE / "payload-upgrade"
    shutil.rmtree(d, ignore_errors=True)
    for src, dst in ((sb.STATE / "lib" / "spank_dask.so", "usr/lib64/slurm/spank_dask.so"),
                     (sb.BIN / "dask-spank", "usr/bin/dask-spank"), (Path(agent), "usr/sbin/dask-node-agent")):
        (d / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, d / dst)
    return d


def start_agent_from(payload: Path | None) -> None:
    if payload is None:
        sb.sandbox("up")
        return
    os.environ["DASK_SPANK_PAYLOAD"] = str(payload)
    try:
        sb.sandbox("up")
    finally:
        del os.environ["DASK_SPANK_PAYLOAD"]


def restart_mid_computation(cluster_name: str, sig, install=None) -> None:
    """The agent stopped by `sig` while a computation runs, then started
    again: the same build, or the payload `install()` returns."""
    sched, arr, c = start(cluster_name, 2)
    before = worker_pids(c)
    sched_pid = [p["pid"] for p in mine(cluster_name) if p["role"] == "scheduler"]
    fut, want = slow_sum(c)
    time.sleep(1.5)
    assert not fut.done()
    stop_agent(sig)
    time.sleep(1)
    start_agent_from(install() if install else None)
    assert int(fut.result(timeout=180)) == want, "the computation completed, right"
    assert worker_pids(c) == before, "no worker was restarted"
    assert [p["pid"] for p in mine(cluster_name) if p["role"] == "scheduler"] == sched_pid
    m = sb.agent_metrics()
    assert m["dask_spank_adopted_total"] == 3 and m["dask_spank_lost_total"] == 0, m
    assert "worker adopted, pid" in worker_log(arr, 1)
    # The new agent supervises them: a worker killed now comes back.
    name, pid = sorted(before.items())[0]
    old = next(a for a, w in c.scheduler_info()["workers"].items() if w["name"] == name)
    os.kill(pid, signal.SIGKILL)
    # The scheduler's view first: a broadcast (worker_pids) that still
    # names the dead address waits out dask's 30 s connect timeout.
    sb.wait_until("the killed worker to come back", lambda: any(
        w["name"] == name and a != old for a, w in c.scheduler_info()["workers"].items()), 30, 0.2)
    assert worker_pids(c).get(name) not in (None, pid)
    c.close()


@pytest.mark.parametrize("worker_start", ["exec", "forkserver"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_agent_restart_mid_computation_loses_nothing(policy, cluster_name, worker_start, sig):
    policy(f"worker_start={worker_start}")
    restart_mid_computation(cluster_name, sig)


def other_build(src: str, dst: str) -> str:
    """A build of the agent that differs from `src`: another commit in its
    version and another GNU build id (both patched in). Returns the commit."""
    data = bytearray(open(src, "rb").read())
    old = subprocess.run([src, "--version"], capture_output=True, text=True).stdout.split("commit ")[1].rstrip(")\n")
    new = "f" * len(old) if old != "f" * len(old) else "e" * len(old)
    assert data.count(old.encode()) >= 1
    data = data.replace(old.encode(), new.encode())
    note = subprocess.run(["readelf", "-n", src], capture_output=True, text=True).stdout
    bid = bytes.fromhex(note.split("Build ID: ")[1].split()[0])
    i = data.find(bid)
    assert i > 0
    data[i] ^= 0xFF
    open(dst, "wb").write(data)
    os.chmod(dst, 0o755)
    return new


def test_an_upgraded_agent_adopts_the_previous_ones_jobs(cluster_name):
    installed = sb.BIN / "dask-node-agent"
    other = sb.STATE / "dask-node-agent.other-build"
    commit = other_build(str(installed), str(other))
    try:
        restart_mid_computation(cluster_name, signal.SIGTERM, lambda: payload_with_agent(str(other)))
        # The agent that adopted them is the other build.
        running = os.readlink(f"/proc/{sb.agent_pid()}/exe")
        assert commit in subprocess.run([running, "--version"], capture_output=True, text=True).stdout
    finally:
        stop_agent(signal.SIGTERM)
        sb.sandbox("up")  # the build tree's agent again


def next_protocol_agent() -> Path:
    """The agent built as the next protocol version would be (the same
    messages, the version bumped: RUSTFLAGS=--cfg dask_spank_next_protocol,
    common/src/lib.rs), in a target directory of its own."""
    target = sb.STATE / "target-next-protocol"
    env = {**os.environ, "CARGO_TARGET_DIR": str(target), "RUSTFLAGS": "--cfg dask_spank_next_protocol"}
    p = subprocess.run(["cargo", "build", "--release", "--locked", "-p", "dask-node-agent"], cwd=sb.REPO, env=env,
                       capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    return target / "release" / "dask-node-agent"


def test_an_agent_upgraded_to_the_next_protocol_keeps_the_running_jobs(cluster_name):
    """The agent of a running cluster is replaced by a build of the next
    protocol version: the jobs' attach processes (and the plugin), which
    speak the version they started with, are still served: their dask
    processes are adopted, the computation completes, a killed worker comes
    back, and a new job starts."""
    nxt = next_protocol_agent()
    current = agentproto.VERSION
    assert sb.agent_speaks(current) and not sb.agent_speaks(current + 1), "the installed agent is this version"
    try:
        restart_mid_computation(cluster_name, signal.SIGTERM, lambda: payload_with_agent(str(nxt)))
        assert sb.agent_speaks(current + 1) and sb.agent_speaks(current), \
            "the new agent is the next version and serves this one"
        # A job of the old plugin and attach starts under the new agent.
        sb.forget_cluster(cluster_name + "-after")
        sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}-after")
        sb.wait_scheduler_file(cluster_name + "-after", 120)
        sb.run(["scancel", sched])
    finally:
        stop_agent(signal.SIGTERM)
        sb.sandbox("up")  # the build tree's agent again


def test_agent_down_20s_while_a_job_is_cancelled_and_a_worker_killed(cluster_name):
    sched, arr, c = start(cluster_name, 2)
    before = worker_pids(c)
    victim = [p for p in mine(cluster_name) if p.get("name", "").endswith(f"{arr}_1")][0]
    (killed_name, killed_pid), = [(n, p) for n, p in before.items() if n.endswith(f"{arr}_2")]
    stop_agent(signal.SIGKILL)
    sb.run(["scancel", f"{arr}_1"])
    os.kill(killed_pid, signal.SIGKILL)
    time.sleep(20)
    sb.sandbox("up")
    # The cancelled job's processes are gone (Slurm's cleanup of its cgroup;
    # the new agent's recovery otherwise), the killed worker is back.
    sb.wait_until("the cancelled job's worker to be gone", lambda: not os.path.exists(f"/proc/{victim['pid']}"), 30)
    sb.wait_until("the killed worker to come back", lambda: worker_pids(c).get(killed_name) not in (None, killed_pid), 60, 0.5)
    assert "ended while the node agent was away; starting it again" in worker_log(arr, 2)
    c.close()


def test_stopping_the_agent_for_good_stops_the_jobs_with_the_reason(policy, cluster_name):
    policy("agent_restart_grace=5s worker_start=forkserver")
    sched, arr, c = start(cluster_name, 1)
    c.close()
    uid = sb.user().pw_uid
    # The scheduler, and the worker forked by its server (named after it).
    assert len(mine(cluster_name)) == 1 and len(forkserver_processes(uid)) == 2

    stop_agent(signal.SIGTERM)
    try:
        t0 = time.monotonic()
        sb.wait_until("every dask process of the node gone", lambda: not mine(cluster_name)
                      and not forkserver_processes(uid), 30, 0.2)
        assert time.monotonic() - t0 < 5 + 5 + 5, "within the grace and the stop"
        for job in (sched, f"{arr}_1"):
            sb.wait_job_gone(job, 30)
            assert sb.job_state(job) == "FAILED"
        assert "lost the node agent: it did not come back within 5s" in worker_log(arr, 1)
    finally:
        sb.sandbox("up")


def test_stop_jobs_stops_them_at_once(cluster_name):
    """The agent's own stop (the jobs end after it, so Slurm kills
    nothing first): the scheduler and workers get SIGTERM together, and a
    worker that does not end (see test_nanny.STUBBORN) is killed 1 s after
    its scheduler went, not after the full 5 s grace."""
    sched, arr, c = start(cluster_name, 1)
    stubborn, pid = stubborn_worker(cluster_name)
    c.close()
    t0 = time.monotonic()
    sb.run([AGENT, "stop-jobs", "--agent-dir", str(sb.STATE / "run" / "agent"), "--node", "n1"])
    sb.wait_until("the cluster's processes gone", lambda: not mine(cluster_name), 15, 0.05)
    gone = time.monotonic() - t0
    print(f"all gone after {gone:.2f}s")
    assert gone < 4.5, f"cluster processes gone after {gone:.2f}s"
    # The agent's lines reach the job's log through its writer (it never
    # waits on the user's file system), so the line may land just after
    # the kill it announces: seen on 24.11 in CI, the processes gone at
    # 1.26 s and the line not yet in the file.
    log = sb.WORK / "log" / f"dask-worker-{stubborn}.log"
    line = f"process group {pid} outlived its scheduler by 1s after SIGTERM: sending SIGKILL"
    sb.wait_until(f"'{line}' in {log}", lambda: line in log.read_text(), 10, 0.1)
    sb.wait_job_gone(sched, 30)
    assert sb.job_state(sched) == "FAILED"
    assert "stopped by the site administrator" in worker_log(arr, 1)
