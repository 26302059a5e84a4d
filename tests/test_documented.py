"""What the admin and user guides promise, each run end to end on the
sandbox: the policy values reaching dask (threads, memory, --mem-per-cpu),
the death timeout, restart limits and backoff, the memory kill's SIGKILL,
agent_timeout with a hung agent, logs --follow, $DASK_SPANK_HOME and the
metrics endpoint."""
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

import sandboxlib as sb
from test_nanny import mine

MiB = 1 << 20


def job_log(job: str, role: str = "worker") -> str:
    """The job's log ("" until the job has started)."""
    f = sb.WORK / "log" / f"dask-{role}-{job}.log"
    return f.read_text() if f.exists() else ""


def scheduler_up(cluster: str) -> str:
    sb.forget_cluster(cluster)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster}")
    sb.wait_scheduler_file(cluster, timeout=120)
    return sched


def test_worker_cpus_and_memory_become_the_workers_threads_and_limit(policy, cluster_name):
    """worker_cpus and worker_mem set the job, and the job sets dask: the
    worker runs as many threads as the job has cpus and takes the job's
    memory as its limit, also when the user asks --mem-per-cpu."""
    policy("worker_cpus=3 worker_mem=700M")
    scheduler_up(cluster_name)
    default = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
    per_cpu = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}", "-c", "2",
                        "--mem-per-cpu=400M")
    assert sb.scontrol_job(per_cpu).get("MinMemoryCPU") == "400M"
    c = sb.client(cluster_name)
    c.wait_for_workers(2, timeout=120)
    got = {w["name"].rsplit("-", 1)[-1]: (w["nthreads"], w["memory_limit"])
           for w in c.scheduler_info()["workers"].values()}
    assert got == {default: (3, 700 * MiB), per_cpu: (2, 800 * MiB)}, got
    # The threads are real: three tasks of one worker run at once.
    def busy(_):
        import threading
        import time as t
        t.sleep(1.5)
        return threading.get_ident()
    addr = next(a for a, w in c.scheduler_info()["workers"].items() if w["nthreads"] == 3)
    t0 = time.monotonic()
    idents = c.gather(c.map(busy, range(3), workers=[addr], pure=False))
    assert len(set(idents)) == 3 and time.monotonic() - t0 < 4.4, idents
    c.close()


@pytest.mark.parametrize("start", ["exec", "forkserver"])
def test_death_timeout_and_restart_limits(policy, cluster_name, start):
    """A worker that cannot reach its scheduler (here: the scheduler is
    stopped, so it accepts TCP but never answers) leaves after
    worker_death_timeout; the nanny counts it as a crash, restarts it after
    a growing delay (it never started: as long as its start took, at least
    5 s, less up to half, then twice that), and gives up after worker_restart_max crashes within
    worker_restart_window: the job ends FAILED with the reason."""
    policy(f"worker_death_timeout=6s worker_restart_max=3 worker_restart_window=5m worker_start={start}")
    scheduler_up(cluster_name)
    (sched_proc,) = [p for p in mine(cluster_name) if p["role"] == "scheduler"]
    os.kill(sched_proc["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
        sb.wait_job_gone(job, 120)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(sched_proc["pid"], signal.SIGCONT)
    log = job_log(job)
    assert log.count("Timed out starting worker") == 3, log
    # The boot code's exit code for a worker that never started (76), and
    # the agent's delays for it, not the crash's (0 s, then 0.1 s).
    assert len(re.findall(r"\]: worker did not start: it timed out reaching its scheduler "
                          r"or failed starting \(exit code 76\)", log)) == 3, log
    # Each waits about as long as its start took (at least 5 s), less up to
    # half, doubled the second time (the log says how long, in whole s).
    waits = [(int(t), float(d)) for t, d in re.findall(r"after (\d+)s; restarting in ([0-9.]+)s", log)]
    assert len(waits) == 2, log
    for i, (took, delay) in enumerate(waits):
        lo, hi = max(5, took) * 2**i, max(5, took + 1) * 2**i
        assert lo / 2 - 0.1 <= delay <= hi, (i, took, delay, log)
    delays = [d for _, d in waits]
    assert "gave up after 3 crashes within 300s; not restarting" in log, log
    assert sb.job_state(job) == "FAILED"
    # Three starts that each waited the whole death timeout (6 s, not the
    # default 60 s), and the two delays.
    assert 3 * 6 + sum(delays) < elapsed < 100, elapsed


@pytest.mark.parametrize("tls,start", [("required", "exec"), ("off", "exec"), ("off", "forkserver")])
def test_a_worker_that_starts_before_its_scheduler_waits_for_it(policy, cluster_name, tls, start):
    """A worker job that runs before its scheduler job (a busy partition
    starts them in any order) waits for the scheduler, and its death
    timeout does not run out meanwhile: the worker waits for the scheduler
    file (the boot code), over TLS before it reads the cluster's
    credentials, which the scheduler job makes. Here the scheduler comes
    after more than three death timeouts: a worker that gave up on it
    after its death timeout, as distributed's does, is a crash, restarted
    (the log says so), and three crashes used up worker_restart_max (shown
    failing so over TCP before the boot code waited: FAILED after 19 s)."""
    policy(f"worker_death_timeout=6s worker_restart_max=3 worker_restart_window=5m tls={tls} "
           f"worker_start={start}")
    sb.forget_cluster(cluster_name, credentials=True)
    job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
    sb.wait_until("the worker job to run", lambda: sb.job_state(job) == "RUNNING", 60, 0.5)
    time.sleep(20)
    assert sb.job_state(job) == "RUNNING", job_log(job)
    # (Not scheduler_up: the worker's job reports stay.)
    sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    sb.wait_scheduler_file(cluster_name, timeout=120)
    c = sb.client(cluster_name)
    c.wait_for_workers(1, timeout=120)
    (w,) = c.scheduler_info()["workers"].values()
    assert w["name"] == f"{cluster_name}-{job}", w
    c.close()
    log = job_log(job)
    assert log.count("dask-spank: waiting for the scheduler file") == 1, log
    assert "restarting in" not in log, log


def test_a_worker_whose_scheduler_came_and_went_leaves_after_its_death_timeout(policy, cluster_name):
    """A worker job that starts after its cluster's scheduler has stopped
    (the state record there, the scheduler file gone, as a scheduler that
    closed leaves them; here made so) does not wait for a scheduler that
    will not come: after its death timeout it says why and leaves, its job
    COMPLETED (before, it waited until its time limit)."""
    policy("worker_death_timeout=6s")
    sb.forget_cluster(cluster_name, credentials=True)
    d = sb.cluster_dir(cluster_name)
    sb.as_user(["mkdir", "-p", str(d)])
    sb.as_user(["sh", "-c", f"echo '{{}}' > {d}/state.json"])
    job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
    t0 = time.monotonic()
    sb.wait_until("the worker job to end", lambda: sb.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                  120, 0.5)
    assert sb.job_state(job) == "COMPLETED", job_log(job)
    log = job_log(job)
    assert "the cluster's scheduler has stopped" in log and "this worker leaves" in log, log
    assert "restarting in" not in log, log
    assert time.monotonic() - t0 < 45, "it waited longer than its death timeout"


def boot_program() -> str:
    """The boot program as the agent hands it to the job's Python
    (node-agent's python_boot: tls_eof.py, then boot.py)."""
    return "".join((sb.REPO / "python" / "dask_spank" / f).read_text() for f in ("tls_eof.py", "boot.py"))


HALF_WRITTEN_PROBE = """
import json, sys, threading, time
path = sys.argv[1]
def written():
    time.sleep(3)
    with open(path, "w") as f:
        json.dump({"address": "tcp://127.0.0.1:9"}, f)
threading.Thread(target=written).start()
t0 = time.monotonic()
wait_or_leave(path, "1s")
print(json.dumps({"waited": time.monotonic() - t0}))
"""


def test_a_worker_waits_for_a_half_written_scheduler_file_and_says_so(tmp_path):
    """distributed writes the scheduler file in place, so a worker can find
    it half written: the boot code waits until it reads as JSON (not only
    until it exists), and says once in the log when it has not for the
    death timeout. Here in the job's Python with the boot program as the
    agent hands it over: a file cut in the middle, made whole 3 s later
    (a death timeout of 1 s)."""
    program = boot_program()
    path = tmp_path / "scheduler.json"
    path.write_text('{"address": "tcp://127.')
    out = subprocess.run([str(sb.VENV / "bin" / "python"), "-c", program + HALF_WRITTEN_PROBE, str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["waited"] > 2.5, out
    assert out.stderr.count(f"the scheduler file {path} has not been readable JSON for 1s") == 1, out.stderr
    assert "waiting for the scheduler file" not in out.stderr, out.stderr



POLL_PROBE = """
import json, sys, threading, time
path = sys.argv[1]
FAST_POLL_S = 1.0  # the module's 10 s, shortened for the test
naps, sleep = [], time.sleep
def counted(s):
    naps.append(s)
    sleep(s)
time.sleep = counted
def written():
    sleep(2)
    with open(path, "w") as f:
        json.dump({"address": "tcp://127.0.0.1:9"}, f)
threading.Thread(target=written).start()
wait_or_leave(path, "60s")
print(json.dumps(naps))
"""


def test_a_worker_looks_for_its_scheduler_file_often_at_first_then_less(tmp_path):
    """A cluster's jobs usually start together: the scheduler file comes a
    second or two after a worker begins waiting, on the critical path of
    every cluster start, so the worker looks every 0.1 s at first (a 0.5 s
    poll cost 0.25 s a start on average), then every 0.5 s (a scheduler job
    Slurm holds: spare the home file system). The boot program's own poll,
    its fast phase shortened to 1 s, the file written after 2 s."""
    path = tmp_path / "scheduler.json"
    out = subprocess.run([str(sb.VENV / "bin" / "python"), "-c", boot_program() + POLL_PROBE, str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    naps = json.loads(out.stdout.splitlines()[-1])
    fast = [n for n in naps if n == 0.1]
    assert naps[:5] == [0.1] * 5 and 8 <= len(fast) <= 11, naps
    assert naps[len(fast):] and set(naps[len(fast):]) == {0.5}, naps

TIMED_START_PROBE = """
import asyncio, json, sys, tempfile
if sys.argv[1] == "boot":
    wait_for_scheduler_file()
from distributed import Worker
with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
    json.dump({"address": "tcp://127.0.0.1:9"}, f)
    f.flush()
    async def made():
        # As the dask-worker command makes it; not started (the death
        # timeout counts from the start).
        Worker(scheduler_file=f.name, nthreads=1, dashboard=True, death_timeout=60)
    asyncio.run(made())
print(json.dumps({m: m in sys.modules for m in ("distributed.dashboard.worker", "bokeh",
                                                "distributed.http.worker.prometheus")}))
"""


def test_a_worker_imports_what_its_timed_start_needs_before_its_death_timeout_counts():
    """distributed imports a worker's HTTP routes and its dashboard's bokeh
    pages inside its start, which its death timeout bounds: a third of a
    second of CPU, on a node with 128 starting workers per core most of a
    60 s death timeout, gone before the worker tries its scheduler. The
    boot code imports them when the worker is made, before it waits for
    its scheduler. Here as the agent hands the boot to the job's Python
    (tls_eof.py, then boot.py), and without the boot, where distributed
    has not imported them by then (so this test can fail)."""
    program = boot_program()
    python = str(sb.VENV / "bin" / "python")

    def imported(mode):
        out = subprocess.run([python, "-c", program + TIMED_START_PROBE, mode], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    assert imported("boot") == {"distributed.dashboard.worker": True, "bokeh": True,
                                "distributed.http.worker.prometheus": True}
    assert imported("plain") == {"distributed.dashboard.worker": False, "bokeh": False,
                                 "distributed.http.worker.prometheus": False}


def test_memory_kill_sends_sigkill_after_the_grace(policy, cluster_name):
    """A worker over worker_memory_kill that ignores SIGTERM is killed
    with SIGKILL 2 s later, and restarted."""
    policy("worker_memory_kill=50%")
    scheduler_up(cluster_name)
    job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}", "--mem=1000M")
    c = sb.client(cluster_name)
    c.wait_for_workers(1, timeout=120)
    ((addr, pid),) = c.run(os.getpid).items()
    # In the worker's main thread (its event loop), where signals are handled.
    c.run(lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN) and None)

    def hog():
        # 650 MiB, 100 MiB/s: over the 500 MiB threshold, far from the
        # job's 1000 MiB cgroup limit.
        import numpy as np
        import time as t
        chunks = []
        for _ in range(65):
            chunks.append(np.ones(10 * MiB // 8, dtype=np.int64))
            t.sleep(0.1)
        t.sleep(60)
        return len(chunks)

    c.submit(hog, pure=False)
    sb.wait_until("the killed worker to be restarted", lambda: "worker restarted, pid" in job_log(job), 60)
    log = job_log(job)
    kill = re.search(r"memory kill: (\d+) MiB resident exceeds 50% of the job's 1000 MiB: terminating", log)
    assert kill and int(kill.group(1)) > 500, log
    assert f"process group {pid} still running 2s after SIGTERM: sending SIGKILL" in log, log
    assert not os.path.exists(f"/proc/{pid}")
    c.wait_for_workers(1, timeout=60)
    c.close()


def test_agent_timeout_fails_the_job_when_the_agent_hangs(policy, cluster_name):
    """slurmstepd waits agent_timeout for a hung agent, no longer: the job
    fails with the reason, and the node goes on running other jobs."""
    policy("agent_timeout=2")
    sb.health_check(False)  # no drain during the test
    agent = sb.agent_pid()
    os.kill(agent, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
        sb.wait_job_gone(job, 60)
        elapsed = time.monotonic() - t0
        # slurmd and slurmstepd are not stuck: an ordinary job runs meanwhile.
        plain = sb.sbatch("--wrap=true", "-o", "/dev/null")
        sb.wait_job_gone(plain, 30)
        assert sb.job_state(plain) == "COMPLETED"
    finally:
        os.kill(agent, signal.SIGCONT)
        sb.health_check(True)
    log = job_log(job)
    assert "the dask-spank node agent on n1 does not answer (node agent did not answer within 2s)" in log, log
    assert sb.job_state(job) == "FAILED"
    assert elapsed < 20, elapsed
    assert not mine(cluster_name)
    # The agent, resumed, serves the next job.
    scheduler_up(cluster_name)


def after(lines: list[str], prefix: str) -> list[str]:
    """The lines from the first that starts with prefix on."""
    starts = [i for i, l in enumerate(lines) if l.startswith(prefix)]
    return lines[starts[0]:] if starts else []


def test_logs_follow_prints_new_lines_and_new_jobs(cluster_name):
    sched = scheduler_up(cluster_name)
    first = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
    sb.wait_until("the worker to start", lambda: "worker started" in job_log(first), 60)
    cmd = ["runuser", "-u", sb.TEST_USER, "--", "env", f"HOME={sb.HOME}", f"PATH={sb.BIN}:/usr/bin:/bin",
           f"SLURM_CONF={sb.ENV['SLURM_CONF']}", "dask-spank", "logs", cluster_name, "--follow"]
    follower = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines: list[str] = []
    try:
        import threading
        threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True).start()
        sb.wait_until("the existing logs", lambda: any(l.startswith(f"==> {first}:") for l in lines), 10)
        # A line appended to a followed log, and a job that starts later.
        sb.run(["scancel", first])
        second = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
        sb.wait_until("the cancelled worker's last lines", lambda: any(
            l.startswith(f"{first}: ") and "worker stopped" in l for l in lines), 30)
        sb.wait_until("the new job's log", lambda: any(l.startswith(f"==> {second}:") for l in lines), 60)
        # The new job's whole log, its header first, then its lines as they come.
        sb.wait_until("the new worker's start", lambda: any(
            "worker started, pid" in l for l in after(lines, f"==> {second}:")), 30)
        assert follower.poll() is None, "logs --follow keeps running"
    finally:
        follower.terminate()
        follower.wait(10)
    sb.run(["scancel", sched])


def test_dask_spank_home_moves_the_users_files(cluster_name):
    """With $DASK_SPANK_HOME set, the jobs write the cluster there, and the
    CLI and the Python API find it there."""
    home = sb.WORK / f"{cluster_name}-home"
    shutil.rmtree(home, ignore_errors=True)  # what an earlier run left
    env = {"DASK_SPANK_HOME": str(home)}
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}", env=env)
    sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}", env=env)
    d = home / "clusters" / cluster_name
    sb.wait_until("the scheduler file under $DASK_SPANK_HOME", lambda: (d / "scheduler.json").exists(), 120)
    assert not sb.cluster_dir(cluster_name).exists()
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    p = sb.as_user(["python", "-c",
                    "import dask_spank, dask.array as da;"
                    f"c = dask_spank.connect('{cluster_name}'); c.wait_for_workers(1, timeout=120);"
                    "print(int(da.arange(1000, chunks=100).sum().compute()))"], env=env, timeout=180, check=False)
    assert p.stdout.strip() == "499500", p.stderr
    # (The scheduler job refreshes the connected workers every 2 s.)
    sb.wait_until("ls to list the cluster with its worker", lambda: [
        c["connected"] for c in json.loads(sb.as_user(["dask-spank", "ls", "--json"], env=env).stdout)
        if c["cluster"] == cluster_name] == [1], 15, 1)
    # The scheduler job's keeper submits the next worker into the same home.
    sb.as_user(["dask-spank", "scale", cluster_name, "2"], env=env)
    sb.wait_until("the keeper's worker to connect", lambda: [
        c["connected"] for c in json.loads(sb.as_user(["dask-spank", "ls", "--json"], env=env).stdout)
        if c["cluster"] == cluster_name] == [2], 90, 1)
    out = sb.as_user(["dask-spank", "down", cluster_name], env=env).stdout
    assert "3 jobs cancelled" in out, out
    sb.wait_job_gone(sched)


METRICS_SCRIPT = """
import socket, sys, time, urllib.request
url = "http://127.0.0.1:%d/metrics" % int(sys.argv[1])
body = urllib.request.urlopen(url, timeout=10).read().decode()
print(sum(l.startswith("dask_spank_jobs ") for l in body.splitlines()))
# Connections that never send a request delay nobody ...
idle = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(8)]
time.sleep(0.5)
t0 = time.monotonic()
body = urllib.request.urlopen(url, timeout=20).read().decode()
print(round(time.monotonic() - t0, 1), "dask_spank_build_info" in body)
# ... and are closed, unanswered, 1 s after they came.
idle[0].settimeout(5)
t0 = time.monotonic()
print(idle[0].recv(16) == b"", round(time.monotonic() - t0 + 0.5, 1))
"""


def test_metrics_over_http_on_loopback_for_every_user_and_bounded():
    """--metrics-addr (the sandbox's agents use it): any local user reads
    the node-wide counts; a connection that sends no request delays no
    scrape and is closed after 1 s; a non-loopback address is refused."""
    p = sb.as_user(["python", "-c", METRICS_SCRIPT, str(sb.METRICS_PORT_N1)], timeout=60)
    first, second, third = p.stdout.split("\n")[:3]
    assert first == "1", p.stdout
    waited, complete = second.split()
    assert complete == "True" and float(waited) < 1.0, p.stdout
    closed, after = third.split()
    assert closed == "True" and 0.5 <= float(after) < 3.0, p.stdout
    # The same numbers as on the agent's socket (root's): every series,
    # read twice over HTTP around the socket's answer (nothing runs now,
    # but a count may move between two reads; it must match one of them).
    url = f"http://127.0.0.1:{sb.METRICS_PORT_N1}/metrics"

    def over_http() -> dict[str, int]:
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        return {k: int(v) for k, v in (l.rsplit(" ", 1) for l in body.splitlines() if l and not l.startswith("#"))
                if "{" not in k}

    before, socket_side, after = over_http(), sb.agent_metrics(), over_http()
    assert len(socket_side) >= 12 and set(socket_side) == set(before), (socket_side, before)
    for name, value in socket_side.items():
        assert value in (before[name], after[name]), (name, value, before[name], after[name])
    # Only loopback: an agent asked for more does not start.
    d = sb.WORK / "metrics-refused"
    d.mkdir(exist_ok=True)
    r = sb.run([str(sb.BIN / "dask-node-agent"), "run", "--agent-dir", str(d), "--node", "nx",
                "--metrics-addr", "0.0.0.0:9"], check=False, timeout=30)
    assert r.returncode != 0
    assert "--metrics-addr 0.0.0.0:9: only loopback addresses are allowed" in r.stderr, r.stderr
