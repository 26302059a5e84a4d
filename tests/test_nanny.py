"""The node agent as a nanny: fault injection on the real sandbox.

Each case breaks something for real (signals, memory, a missing env, the
agent itself) and asserts what a user or an admin would check afterwards.
"""
import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime

import pytest

import sandboxlib as sb


def mine(cluster: str) -> list[dict]:
    return sb.cluster_processes(cluster)


def start(cluster: str, workers: int, *extra: str, worker_args=(), env=None):
    sb.forget_cluster(cluster)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster}", *extra, env=env)
    arr = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster}", f"--array=1-{workers}",
                    *extra, *worker_args)
    sb.wait_scheduler_file(cluster, timeout=120)
    c = sb.client(cluster)
    c.wait_for_workers(workers, timeout=120)
    return sched, arr, c


def worker_log(arr: str, task) -> str:
    return (sb.WORK / "log" / f"dask-worker-{arr}_{task}.log").read_text()


def kill_a_worker_mid_computation(c) -> tuple[float, str]:
    """SIGKILL a worker in the middle of a computation; the seconds until a
    worker of the same name registers again, and that name. Asserts that
    the computation's result is still right."""
    import dask.array as da

    def slow_square(b):
        import time as t
        t.sleep(0.05)
        return b * b

    n = 400_000
    x = da.arange(n, chunks=n // 200, dtype="int64")
    fut = c.compute(x.map_blocks(slow_square).sum())
    time.sleep(1.0)
    assert not fut.done(), "the computation must still be running when the worker is killed"
    addr, pid = sorted(c.run(os.getpid).items())[0]
    name = c.scheduler_info()["workers"][addr]["name"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    sb.wait_until("the killed worker to re-register", lambda: any(
        w["name"] == name and a != addr for a, w in c.scheduler_info()["workers"].items()), 10, 0.01)
    back = time.monotonic() - t0
    assert int(fut.result(timeout=120)) == sum(i * i for i in range(n))
    return back, name


def test_1_sigkill_during_a_computation_result_correct_and_back_quickly(cluster_name):
    """The first restart is immediate: the job's log says `restarting in
    0.0s`, and the agent's `worker restarted` line follows within 2 s by
    its clock (a restart that waited even the backoff's third step would
    show more), and the worker is back, with the result right. How fast a
    restart is end to end (a cold Python start: 0.4 s on an idle machine,
    3.7 s once in a CI run with three lanes on 2 cores, which failed the
    3 s bound this test had) is scripts/bench's figure, not this test's."""
    sched, arr, c = start(cluster_name, 2)
    back, name = kill_a_worker_mid_computation(c)
    restarted_at_once(worker_log(arr, name.rsplit("_", 1)[-1]))
    print(f"worker back after {back:.2f}s")
    c.close()


def restarted_at_once(log: str) -> str:
    """Assert that the job's log shows the killed worker restarted at once
    (`restarting in 0.0s`, then the agent's `worker restarted` line within
    2 s by its clock); the restart's line."""
    died = re.search(r"^(\S+) dask-spank\[\S+\]: worker died \(killed by SIGKILL\); restarting in ([0-9.]+)s$",
                     log, re.M)
    assert died and died.group(2) == "0.0", log
    again = re.compile(r"^(\S+) dask-spank\[\S+\]: worker restarted, pid.*$", re.M).search(log, died.end())
    assert again, log
    at = [datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ") for m in (died, again)]
    assert 0 <= (at[1] - at[0]).total_seconds() <= 2, log
    return again.group(0)


def env_without_distributed():
    env = sb.WORK / "env-without-distributed"
    if not (env / "bin" / "python").exists():
        sb.as_user(["/usr/bin/python3", "-m", "venv", "--without-pip", str(env)])
    return env


def worker_in_env(cluster: str, env, timeout: float) -> tuple[str, str, str]:
    """A scheduler, and one worker job with this --dask-env, run to the
    worker's end: the two job ids and the worker's log."""
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster}")
    sb.wait_scheduler_file(cluster)
    job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster}", f"--dask-env={env}")
    sb.wait_job_gone(job, timeout)
    return sched, job, (sb.WORK / "log" / f"dask-worker-{job}.log").read_text()


def test_2_crash_looping_worker_is_given_up_with_the_reason(cluster_name):
    sched, job, log = worker_in_env(cluster_name, env_without_distributed(), 90)
    assert "No module named 'distributed'" in log
    assert log.count("worker died (exit code 1); restarting in") == 4
    assert "worker died (exit code 1); gave up after 5 crashes within 60s; not restarting" in log
    assert sb.job_state(job) == "FAILED"
    st = [j for j in sb.agent_status() if j["job_id"] == int(job)]
    assert st and st[0]["state"] == "failed", st
    assert "gave up after 5 crashes within 60s" in st[0]["reason"]
    assert st[0]["restarts"] == 4
    sb.run(["scancel", sched])


@pytest.mark.parametrize("worker_start", ["exec", "forkserver"])
def test_3_worker_over_its_memory_limit_is_killed_and_restarted(policy, cluster_name, worker_start):
    policy(f"worker_start={worker_start}")
    memory_kill_and_restart(cluster_name, worker_start)


def memory_kill_and_restart(cluster_name: str, worker_start: str) -> None:
    before = sb.agent_metrics()
    sched, arr, c = start(cluster_name, 1, worker_args=("--mem=600M",))
    addr = next(iter(c.scheduler_info()["workers"]))

    def hog():
        # Grows at 100 MiB/s, to 800 MiB: well below the watchdog's
        # assumed worst (1 GiB/s). Faster growth meets the job's cgroup
        # limit first, which the kernel enforces (test_hostile::test_5).
        import numpy as np
        import time as t
        chunks = []
        for _ in range(80):
            chunks.append(np.ones(10 * 1024 * 1024 // 8, dtype=np.int64))
            t.sleep(0.1)
        t.sleep(30)
        return len(chunks)

    fut = c.submit(hog, pure=False)
    sb.wait_until("a memory kill in the worker's log", lambda: "memory kill:" in worker_log(arr, 1), 60)
    sb.wait_until("the worker to come back", lambda: any(
        a != addr for a in c.scheduler_info()["workers"]), 60)
    fut.cancel()
    log = worker_log(arr, 1)
    assert "exceeds 95% of the job's 600 MiB: terminating the worker" in log
    assert "worker restarted, pid" in log
    assert ("forked by the fork server" in log) == (worker_start == "forkserver")
    after = sb.agent_metrics()
    assert after["dask_spank_memory_kills_total"] == before["dask_spank_memory_kills_total"] + 1
    assert after["dask_spank_worker_restarts_total"] == before["dask_spank_worker_restarts_total"] + 1
    st = [j for j in sb.agent_status() if j["label"] == f"{arr}_1"][0]
    assert st["memory_kills"] >= 1
    c.close()


def test_4_scancel_the_scheduler_ends_every_worker_job(cluster_name):
    sched, arr, c = start(cluster_name, 3)
    c.close()
    t0 = time.monotonic()
    sb.run(["scancel", sched])
    sb.wait_job_gone(arr, 70)
    elapsed = time.monotonic() - t0
    # The workers leave as soon as their scheduler closes: well under their
    # 60 s death timeout.
    assert elapsed < 20, elapsed
    sb.wait_until("no dask process of the cluster", lambda: not mine(cluster_name), 10)
    for t in (1, 2, 3):
        assert "worker exited (exit code 0)" in worker_log(arr, t) or "worker leaves" in worker_log(arr, t)
        assert sb.job_state(f"{arr}_{t}") == "COMPLETED"


def test_5_scancel_a_worker_job_kills_its_processes_within_5s(cluster_name):
    sched, arr, c = start(cluster_name, 2)
    c.close()
    victim = [p for p in mine(cluster_name) if p.get("name", "").endswith(f"{arr}_1")][0]
    t0 = time.monotonic()
    sb.run(["scancel", f"{arr}_1"])
    sb.wait_until("the worker's process to exit", lambda: not os.path.exists(f"/proc/{victim['pid']}"), 5, 0.05)
    print(f"gone after {time.monotonic() - t0:.2f}s")
    assert len([p for p in mine(cluster_name) if p["role"] == "worker"]) == 1


# A worker that does not end (test_5b): it ignores SIGTERM, and a thread
# of the user's code that never ends keeps its process alive after the
# worker closed (Python waits for non-daemon threads at exit), as a close
# hung on the lost scheduler would. A dask preload, as the user's own code.
STUBBORN = """\
import signal
import threading
import time


def dask_setup(worker):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=time.sleep, args=(3600,), name="never-ends").start()
"""


def stubborn_worker(cluster: str) -> tuple[str, int]:
    """Add a worker job whose worker does not end (see STUBBORN) to a
    running cluster; its job id and pid."""
    preload = sb.WORK / "stubborn_worker.py"
    preload.write_text(STUBBORN)
    job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster}",
                    env={"DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{preload}"]'})
    pid = sb.wait_until("the stubborn worker", lambda: [
        p["pid"] for p in mine(cluster) if p.get("name", "").endswith(f"-{job}")], 60)[0]
    sb.wait_until("the stubborn worker to ignore SIGTERM", lambda: int(dict(
        l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines())["SigIgn"], 16)
        & (1 << (signal.SIGTERM - 1)), 60)
    return job, pid


def test_5b_cancelling_a_whole_cluster_ends_every_process_well_before_the_grace(cluster_name):
    """scancel of a whole cluster, with a worker that does not end (see
    STUBBORN): every process is gone within a second or so, far under the
    agent's 5 s grace. What ends them here is Slurm killing the job's
    cgroup, which the agent put them in; where that does not happen (a
    site without proctrack/cgroup), the agent's own stop does, and that
    path is tested by tests/test_restart.py::test_stop_jobs_stops_them_at_once."""
    sched, arr, c = start(cluster_name, 4)
    stubborn, _ = stubborn_worker(cluster_name)
    c.close()
    assert len(mine(cluster_name)) == 6
    t0 = time.monotonic()
    sb.run(["scancel", sched, arr, stubborn])
    sb.wait_until("no dask process of the cluster", lambda: not mine(cluster_name), 10, 0.05)
    gone = time.monotonic() - t0
    print(f"all gone after {gone:.2f}s")
    assert gone < 4.5, f"cluster processes gone after {gone:.2f}s"
    for t in range(1, 5):
        assert "still running 5s after SIGTERM" not in worker_log(arr, t)


# The agent killed or restarted: tests/test_restart.py (its processes run
# on and are adopted).


def test_7_users_cannot_touch_other_jobs():
    u2 = sb.other_user().pw_name
    sb.forget_cluster("nanny-7")
    job = sb.sbatch("--dask-role=scheduler", "--dask-cluster=nanny-7")
    sb.wait_scheduler_file("nanny-7")
    attach = {"type": "attach", "job_id": int(job), "cwd": "/", "env": [], "cluster_dir": "/tmp"}
    # Another user: refused, the job belongs to someone else.
    r = sb.agent_request(attach, user=u2)
    assert r["type"] == "error" and f"job {job} belongs to uid {sb.user().pw_uid}" in r["message"], r
    # The owner, but from outside the job: refused too.
    r = sb.agent_request(attach)
    assert r["type"] == "error" and "is not a process of job" in r["message"], r
    # Status shows a user only their own jobs; metrics are root's.
    p = subprocess.run(["runuser", "-u", u2, "--", str(sb.BIN / "dask-node-agent"), "status", "--json",
                        "--agent-dir", str(sb.STATE / "run" / "agent"), "--node", "n1"],
                       capture_output=True, text=True, check=True)
    # (u2 may see its own jobs that ended a moment ago: the agent keeps
    # ended jobs a while for their status; other tests used u2.)
    seen = json.loads(p.stdout)
    assert all(j["user"] == u2 for j in seen), seen
    assert not any(j["job_id"] == int(job) for j in seen), seen
    assert any(j["job_id"] == int(job) for j in sb.agent_status())
    p = sb.as_user([str(sb.BIN / "dask-node-agent"), "metrics", "--agent-dir",
                    str(sb.STATE / "run" / "agent"), "--node", "n1"], check=False)
    assert p.returncode != 0 and "only root" in p.stderr
    # And the job still runs, untouched.
    assert sb.job_states(job)
    sb.run(["scancel", job])


def test_8_dask_processes_have_no_privileges(cluster_name):
    sched, arr, c = start(cluster_name, 1)
    c.close()
    u = sb.user()
    for p in mine(cluster_name):
        status = dict(l.split(":", 1) for l in open(f"/proc/{p['pid']}/status").read().splitlines() if ":" in l)
        status = {k: v.strip() for k, v in status.items()}
        assert status["CapEff"] == "0000000000000000"
        assert status["CapPrm"] == "0000000000000000"
        assert status["CapBnd"] == "0000000000000000"
        assert status["CapAmb"] == "0000000000000000"
        assert status["NoNewPrivs"] == "1"
        assert status["Uid"].split() == [str(u.pw_uid)] * 4
        assert status["Gid"].split() == [str(u.pw_gid)] * 4
        assert sorted(int(g) for g in status["Groups"].split()) == sorted(os.getgrouplist(u.pw_name, u.pw_gid))
    # The agent keeps exactly the documented capabilities (docs/admin.md)
    # that this machine grants it (its bounding set), in every set.
    documented = {"CAP_SETUID": 7, "CAP_SETGID": 6, "CAP_SETPCAP": 8, "CAP_KILL": 5,
                  "CAP_SYS_RESOURCE": 24, "CAP_DAC_OVERRIDE": 1}
    for name in documented:
        assert f"`{name}`" in (sb.REPO / "docs" / "admin.md").read_text(), name
    want = sum(1 << bit for bit in documented.values())
    agent = dict(l.split(":", 1) for l in open(f"/proc/{sb.agent_pid()}/status").read().splitlines() if ":" in l)
    own = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    granted = int(own["CapBnd"], 16)  # what the machine gives root here
    for s in ("CapEff", "CapPrm", "CapBnd"):
        assert int(agent[s], 16) == want & granted, (s, agent[s], hex(want & granted))
    assert int(agent["CapAmb"], 16) == 0 and int(agent["CapInh"], 16) == 0


def test_9_worker_near_its_walltime_retires_and_no_task_is_lost(cluster_name):
    import dask.array as da

    # A long-lived worker, and a worker job with 2 minutes of walltime: with
    # the default 5-minute margin it retires at half of it (60 s). The
    # scheduler keeps its whole transition log (DASK_ADMIN__LOW_LEVEL_LOG_LENGTH).
    sched, arr, c = start(cluster_name, 1, env={"DASK_ADMIN__LOW_LEVEL_LOG_LENGTH": "100000"})
    short = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}", "-t", "2")
    c.wait_for_workers(2, timeout=60)
    assert "--lifetime" in (sb.WORK / "log" / f"dask-worker-{short}.log").read_text()
    x = da.random.RandomState(0).random(2_000_000, chunks=20_000)
    xs = c.persist(x)  # data on both workers
    from distributed import wait
    wait(xs)
    short_addr = [a for a, w in c.scheduler_info()["workers"].items() if w["name"].endswith(f"-{short}")][0]
    held = {k for k in c.has_what()[short_addr]}
    assert held, "the retiring worker holds results"
    sb.wait_until("the short worker to retire", lambda: len(c.scheduler_info()["workers"]) == 1, 100, 1)
    # Every result it held moved to the other worker: none was computed
    # again (each key went to 'processing' once, before the retirement).
    keys = {str(k) for k in held}
    log = c.run_on_scheduler(lambda dask_scheduler: [(str(t[0]), t[2]) for t in dask_scheduler.transition_log])
    processing = {}
    for key, finish in log:
        if key in keys and finish == "processing":
            processing[key] = processing.get(key, 0) + 1
    assert processing and set(processing.values()) == {1}, processing
    assert all(k in c.has_what()[next(iter(c.scheduler_info()["workers"]))] for k in held)
    total = float(xs.sum().compute())
    assert total == pytest.approx(float(x.sum().compute()))
    sb.wait_job_gone(short, 30)
    assert sb.job_state(short) == "COMPLETED", "the job ended before Slurm's time limit"
    log = (sb.WORK / "log" / f"dask-worker-{short}.log").read_text()
    assert "worker exited (exit code 0)" in log
    c.close()



def forkserver_processes(uid: int) -> list[dict]:
    """Fork servers and the workers forked from them (their command line is
    the server's), from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            args = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            # A process may name itself in bytes that are not UTF-8.
            comm = open(f"/proc/{d}/comm", "rb").read().decode(errors="replace").strip()
            status = open(f"/proc/{d}/status", "rb").read().decode(errors="replace")
        except OSError:
            continue
        st = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
        if b"dask-spank-forkserver" in args and int(st["Uid"].split()[0]) == uid \
                and not st["State"].strip().startswith("Z"):
            out.append({"pid": int(d), "comm": comm, "CapEff": st["CapEff"].strip(),
                        "NoNewPrivs": st["NoNewPrivs"].strip()})
    return out


def test_10_forkserver_restarts_a_killed_worker_fast_and_leaves_nothing(policy, cluster_name):
    uid = sb.user().pw_uid
    policy("worker_start=forkserver")
    sched, arr, c = start(cluster_name, 2)
    procs = forkserver_processes(uid)
    assert sorted(p["comm"] for p in procs) == ["dask-forkserver"] * 2 + ["dask-worker"] * 2, procs
    assert all(p["CapEff"] == "0000000000000000" and p["NoNewPrivs"] == "1" for p in procs), procs
    assert sb.agent_metrics()["dask_spank_forkservers_running"] == 2
    back, name = kill_a_worker_mid_computation(c)
    log = worker_log(arr, name.rsplit("_", 1)[1])
    server = re.search(r"fork server started, pid (\d+)", log)
    assert server, log
    # Forked by the same fork server, which skips the interpreter start
    # and the imports of a cold start: how much faster that is (0.37 s
    # against the Nanny's 0.67 s, docs/performance.md; 2.7 s once while
    # another release's tests ran beside, which failed the 1 s bound this
    # test had) is scripts/bench's figure, not this test's.
    line = restarted_at_once(log)
    assert f"forked by the fork server (pid {server.group(1)})" in line, line
    print(f"forked worker back after {back:.3f}s")
    c.close()
    sb.run(["scancel", sched, arr])
    sb.wait_until("no fork server or forked worker left",
                  lambda: not forkserver_processes(uid), 30)
    # The agent counts a fork server out when it has handled its end, a
    # moment after the process is gone from /proc.
    sb.wait_until("the agent to count no fork server",
                  lambda: sb.agent_metrics()["dask_spank_forkservers_running"] == 0, 10)


def test_10b_forkserver_without_distributed_fails_at_once_with_the_traceback(policy, cluster_name):
    policy("worker_start=forkserver")
    sched, job, log = worker_in_env(cluster_name, env_without_distributed(), 60)
    assert "No module named 'distributed'" in log
    assert "the fork server died (see its traceback above in this log)" in log
    assert "restarting in" not in log
    assert sb.job_state(job) == "FAILED"
    sb.run(["scancel", sched])


def test_10c_a_lying_fork_server_cannot_make_the_agent_signal_others(policy, cluster_name):
    """The fork server runs the user's code. A user whose env makes it
    claim to have forked another process (here a root process) only fails
    their own job: the agent signals nothing it cannot verify."""
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    env = sb.WORK / f"env-lying-{cluster_name}"
    try:
        sb.as_user(["/usr/bin/python3", "-m", "venv", "--without-pip", str(env)])
        site = next((env / "lib").glob("python3*/site-packages"))
        pkg = site / "distributed" / "cli"
        attack = (
            "import json, os, socket, time\n"
            "for fd in range(3, 64):\n"
            "    try:\n"
            "        s = socket.socket(fileno=os.dup(fd))\n"
            "    except OSError:\n"
            "        continue\n"
            "    if s.family == socket.AF_UNIX:\n"
            f"        s.sendall(json.dumps({{'event': 'forked', 'pid': {victim.pid}}}).encode() + b'\\n')\n"
            "        break\n"
            "time.sleep(60)\n"
        )
        sb.as_user(["mkdir", "-p", str(pkg)])
        for f, text in [(site / "distributed" / "__init__.py", ""), (pkg / "__init__.py", ""),
                        (pkg / "dask_worker.py", attack)]:
            sb.as_user(["/usr/bin/python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                        str(f), text])
        policy("worker_start=forkserver")
        sched, job, log = worker_in_env(cluster_name, env, 60)
        assert f"the fork server reported pid {victim.pid}, which is not a worker it forked" in log, log
        assert sb.job_state(job) == "FAILED"
        time.sleep(1)
        assert victim.poll() is None, "the agent signalled a process that is not the job's"
        sb.run(["scancel", sched])
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("how", ["exec", "forkserver"])
def test_11_client_restart_brings_every_worker_back_in_place(policy, how, cluster_name):
    """`client.restart()`, a notebook habit: the scheduler removes every
    worker (they have no Nanny: the agent is theirs), and each comes back in
    its same job within seconds: no job ends, none is submitted. Workers
    submitted by hand, so no keeper could paper over it."""
    if how == "forkserver":
        policy("worker_start=forkserver")
    sched, arr, c = start(cluster_name, 2)
    try:
        assert c.submit(sum, [1, 2]).result(timeout=30) == 3
        jobs = sb.job_states(arr)
        before = set(c.scheduler_info()["workers"])
        t0 = time.monotonic()
        c.restart(timeout=60)
        c.wait_for_workers(2, timeout=60)
        took = time.monotonic() - t0
        after = set(c.scheduler_info()["workers"])
        assert not before & after, "new worker processes"
        assert took < 20, f"the workers came back after {took:.1f}s"
        assert sb.job_states(arr) == jobs, "the same jobs, still running"
        assert c.submit(sum, [3, 4]).result(timeout=30) == 7
        for task in (1, 2):
            log = worker_log(arr, task)
            assert "its scheduler removed the running worker (client.restart()): restarting it in place" in log, log
        print(f"{how}: back in place {took:.1f}s after client.restart()")
    finally:
        c.close()
        sb.run(["scancel", sched, arr])


def fill_accept_queue(addr: str) -> list:
    """Connections to `addr` (a dask address) until one gets no answer in
    half a second: the listener's accept queue is full (its process
    stopped), as with a scheduler whose event loop hundreds of starting
    workers hold. The connections that filled it."""
    import socket

    host, port = addr.split("://")[-1].rsplit(":", 1)
    held = []
    for _ in range(64):
        s = socket.socket()
        s.settimeout(0.5)
        try:
            s.connect((host, int(port)))
        except OSError:
            s.close()
            return held
        held.append(s)
    raise AssertionError(f"{addr}: 64 connections and the accept queue is still not full")


def test_12_a_worker_whose_scheduler_is_silent_for_a_while_is_restarted_not_let_go(cluster_name):
    """A worker that dies while its scheduler gives no answer (no
    connection, no refusal) is restarted once the scheduler answers again
    within the grace, not let go as if the scheduler were gone. The
    silence is made real: the scheduler's accept queue (a backlog of one,
    set through the job's dask config) filled while its process is
    stopped. Run T (N=256 on 2 cores) lost nine workers of a live scheduler
    to one silent 2 s probe."""
    env = {"DASK_DISTRIBUTED__COMM__SOCKET_BACKLOG": "1"}
    sched, arr, c = start(cluster_name, 1, env=env)
    held = []
    sched_pid = None
    try:
        (addr, pid), = c.run(os.getpid).items()
        name = c.scheduler_info()["workers"][addr]["name"]
        sched_pid = c.run_on_scheduler(os.getpid)
        os.kill(sched_pid, signal.SIGSTOP)
        held = fill_accept_queue(c.scheduler.address)
        os.kill(pid, signal.SIGKILL)
        time.sleep(6)  # the agent probes meanwhile, and gets no answer
        os.kill(sched_pid, signal.SIGCONT)
        sched_pid = None
        sb.wait_until("the worker to register again", lambda: any(
            w["name"] == name and a != addr for a, w in c.scheduler_info()["workers"].items()), 60, 0.2)
        log = worker_log(arr, 1)
        assert "the worker leaves" not in log, log
        assert "worker died (killed by SIGKILL)" in log, log
        assert sb.job_states(arr) == {f"{arr}_1": "RUNNING"}, sb.job_states(arr)
    finally:
        if sched_pid:
            os.kill(sched_pid, signal.SIGCONT)
        for s in held:
            s.close()
        c.close()
        sb.run(["scancel", sched, arr])
