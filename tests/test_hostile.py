"""Hostile users against the root node agent (issue 12).

Each test runs an attack as the unprivileged test user, with nothing but
job scripts, Python and the agent's public socket, on the real sandbox.
While it runs, a watcher pings the agent as root every 100 ms and samples
its resident memory: the agent must answer every ping within a second and
stay bounded, and nothing past the job's own limits may be granted.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import agentproto
import sandboxlib as sb
from rootopens import RootOpens, proc_status

# Generous for a loaded 2-core machine; a blocked agent misses it by far.
PING_BOUND_S = 1.0
RSS_GROWTH_BOUND_MIB = 40


def agent_rss_mib() -> float:
    for line in open(f"/proc/{sb.agent_pid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# The watcher proper: a process of its own, so that nothing in the test's
# process (its threads, the GIL, a subprocess it waits on) delays a ping.
# It pings until its stdin closes, then prints what it saw as JSON.
WATCHER = r"""
import json, select, sys, time
import agentproto
socket, pid = sys.argv[1], sys.argv[2]

def rss_mib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

worst, failures, rss_max = 0.0, [], rss_mib()
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.1)[0]:
    t0 = time.monotonic()
    try:
        c = agentproto.Conn(socket, "watch", timeout=5)
        r = c.call({"type": "ping"})
        c.close()
        if r.get("type") != "ok":
            failures.append(json.dumps(r))
    except Exception as e:  # any failure is the finding
        failures.append(repr(e))
    worst = max(worst, time.monotonic() - t0)
    try:
        rss_max = max(rss_max, rss_mib())
    except (OSError, RuntimeError) as e:
        failures.append(repr(e))
print(json.dumps({"worst": worst, "failures": failures, "rss_max": rss_max}), flush=True)
"""


class AgentWatch:
    """Ping the agent as root every 100 ms, from a process of its own; keep
    the slowest answer (a failed or missing answer counts as infinitely
    slow) and the largest RSS."""

    def __init__(self):
        self.worst = 0.0
        self.failures: list[str] = []
        self.rss0 = agent_rss_mib()
        self.rss_max = self.rss0

    def __enter__(self):
        scripts = str(Path(agentproto.__file__).resolve().parent)
        self._p = subprocess.Popen([sys.executable, "-c", WATCHER, str(sb.agent_socket()), str(sb.agent_pid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": scripts})
        assert self._p.stdout.readline().strip() == "ready", "the agent watcher did not start"
        return self

    def __exit__(self, kind, value, tb):
        try:
            out, _ = self._p.communicate("stop\n", timeout=30)
            seen = json.loads(out.strip().splitlines()[-1])
            self.worst, self.failures, self.rss_max = seen["worst"], seen["failures"], seen["rss_max"]
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            self._p.kill()
            self._p.wait()
            self.failures.append(f"the watcher itself failed: {e!r}")
        # A test that failed inside the watch, while the agent did not
        # answer: that is the finding, say it first.
        if kind is not None and self.failures:
            raise AssertionError(f"the agent did not answer ({self.failures[:3]}) while: {value!r}") from value

    def check(self, bound: float = PING_BOUND_S):
        assert not self.failures, f"the agent did not answer: {self.failures[:3]}"
        assert self.worst < bound, f"the agent took {self.worst:.3f}s to answer a ping (bound {bound}s)"
        growth = self.rss_max - self.rss0
        assert growth < RSS_GROWTH_BOUND_MIB, f"the agent grew by {growth:.0f} MiB"


def script(name: str, body: str) -> Path:
    """A job script in the test user's work directory."""
    p = sb.WORK / f"{name}.sh"
    p.write_text("#!/bin/bash\n" + body)
    os.chmod(p, 0o755)
    shutil.chown(p, sb.TEST_USER, sb.TEST_USER)
    return p


def user_file(name: str, text: str) -> Path:
    p = sb.WORK / name
    p.write_text(text)
    shutil.chown(p, sb.TEST_USER, sb.TEST_USER)
    return p


def job_log(job: str) -> str:
    f = sb.WORK / "log" / f"hostile-{job}.log"
    return f.read_text() if f.exists() else ""


def computes(cluster: str) -> None:
    """A normal cluster of the test user computes a verified result."""
    sb.forget_cluster(cluster)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster}")
    sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster}")
    sb.wait_scheduler_file(cluster, timeout=120)
    c = sb.client(cluster)
    try:
        c.wait_for_workers(1, timeout=120)
        assert c.submit(sum, range(1000)).result(timeout=60) == 499500
    finally:
        c.close()
        sb.run(["scancel", sched])


def test_1_a_full_pipe_as_the_job_output_cannot_freeze_the_agent(cluster_name):
    """The job hands over a pipe that nobody reads, full: refused, and the
    agent never writes to it, so every other job goes on."""
    s = script("full-pipe", "{ head -c 65536 /dev/zero; exec dask-spank attach; } | sleep 600\n")
    with AgentWatch() as w:
        job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}-x",
                        "-o", "log/hostile-%j.log", str(s))
        sb.wait_until("the refusal in the job log", lambda: "is a pipe" in job_log(job), 60)
        computes(cluster_name)
    w.check()
    assert "it must be the job's log file" in job_log(job)
    sb.run(["scancel", job])


@pytest.mark.parametrize("trap", ["dev-zero", "fifo", "sparse"])
def test_2_root_never_reads_a_scheduler_file_trap(policy, trap, cluster_name):
    """The cluster's scheduler file is a symlink to /dev/zero, a FIFO or a
    sparse 100 GB file. The worker dies and its job is stopped, the two
    moments the agent used to read that file as root; it must not: the
    kernel's view (tests/rootopens.py) shows no root process of the
    agent's or Slurm's opening it, while it does show the user's worker
    opening it (so the watch sees what happens there). The agent answers
    and stays small throughout. Shown failing: an agent that reads 64
    bytes of the file as root on a thread of its own when it restarts the
    worker passed the ping and memory checks and fails this for the FIFO
    and the sparse file (a quick read of /dev/zero, a device, falls
    between the watch's samples: see rootopens.py). (TLS off: a TLS worker would wait for its
    scheduler's credentials.)"""
    policy("tls=off")
    name = f"{cluster_name}-{trap}"
    d = sb.cluster_dir(name)
    sb.as_user(["mkdir", "-p", str(d)])
    f = d / "scheduler.json"
    sb.as_user(["rm", "-f", str(f)])
    make = {"dev-zero": ["ln", "-s", "/dev/zero", str(f)], "fifo": ["mkfifo", str(f)],
            "sparse": ["truncate", "-s", "100G", str(f)]}[trap]
    sb.as_user(make)
    with RootOpens(f, [sb.agent_pid()]) as opens, AgentWatch() as w:
        job = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "-o", "log/hostile-%j.log")
        pid = sb.wait_until("the worker to run", lambda: next(
            (j["pid"] for j in sb.agent_status() if str(j["job_id"]) == job and j["state"] == "running"), None), 60)
        uid = sb.user().pw_uid
        sb.wait_until("the worker to open its scheduler file", lambda: any(
            e["pid"] == pid and e["uids"][1] == uid for e in opens.events), 30)
        # (Reading a sparse 100 GB file, it may have died of it already.)
        sb.as_user(["kill", "-9", str(pid)], check=False)
        sb.wait_until("the worker to be restarted", lambda: "worker restarted" in job_log(job), 30)
        sb.run(["scancel", job])
        sb.wait_job_gone(job)
    assert not opens.root_openers(), f"root opened the user's {trap} trap: {opens.root_openers()}"
    w.check()
    assert not sb.cluster_processes(name)


def test_3_a_forged_attach_cannot_raise_the_jobs_limits(policy, cluster_name):
    """The job script lowers its own limits, then attaches with a message
    asking for much higher ones: dask gets exactly the job's limits. (TLS
    off: this hand-made attach does not make the cluster's credentials.)"""
    policy("tls=off")
    proto = user_file("agentproto.py", Path(agentproto.__file__).read_text())
    ask = [{"resource": r, "soft": 2**64 - 1, "hard": 2**64 - 1} for r in range(16)]
    s = script("forged-limits", f"""
mkdir -p "$HOME/.dask-spank/clusters/{cluster_name}"
ulimit -Hn 4000 && ulimit -Sn 3000
cat /proc/$$/limits > limits-$SLURM_JOB_ID.txt
exec python3 {proto} attach "$DASK_SPANK_AGENT_SOCKET" "$SLURM_JOB_ID" \\
  "$HOME/.dask-spank/clusters/{cluster_name}" /dev/stdout '{json.dumps({"rlimits": ask})}'
""")
    sb.forget_cluster(cluster_name)
    job = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}", "-o", "log/hostile-%j.log", str(s))
    sb.wait_scheduler_file(cluster_name, timeout=60)
    [sched] = sb.cluster_processes(cluster_name)
    job_limits = (sb.WORK / f"limits-{job}.txt").read_text()
    dask_limits = open(f"/proc/{sched['pid']}/limits").read()
    assert "Max open files            3000                 4000" in dask_limits, dask_limits
    # Every limit, not only the one lowered, is the job's.
    assert dask_limits.splitlines()[1:-1] == job_limits.splitlines()[1:-1]
    sb.run(["scancel", job])


def bypass_env() -> dict:
    """A client-side slurm.conf whose plugstack.conf lacks the plugin: the
    submit-side checks are skipped, only the node can catch the job."""
    d = sb.WORK / "hostile-bypass"
    d.mkdir(exist_ok=True)
    (d / "plugstack.conf").write_text("# no dask-spank here\n")
    conf = [l for l in (sb.STATE / "etc" / "slurm.conf").read_text().splitlines()
            if not l.startswith("PlugStackConfig=")]
    (d / "slurm.conf").write_text("\n".join(conf + [f"PlugStackConfig={d / 'plugstack.conf'}"]) + "\n")
    shutil.chown(d, sb.TEST_USER, sb.TEST_USER)
    return {"SLURM_CONF": str(d / "slurm.conf")}


def test_4_text_fields_and_the_environment_cannot_fake_job_facts(cluster_name):
    """A 64 GB worker submitted past the submit-side checks, with key=value
    words and separators in its comment and account, and a faked
    SLURM_JOB_USER: refused on the node with the real reason."""
    env = bypass_env()
    env.update({"_SLURM_SPANK_OPTION_dask_spank_dask_role": "worker",
                "_SLURM_SPANK_OPTION_dask_spank_dask_cluster": cluster_name,
                "SLURM_JOB_USER": "root"})
    s = script("faked", "exec dask-spank attach\n")
    fake = "x Partition=htc NumCPUs=1 MinMemoryNode=3G Licenses=sps"
    common = ["-p", "htc", "-L", "sps", "-n", "1", "-t", "1:00:00", f"--job-name=dask-worker-{cluster_name}",
              "-o", "log/hostile-%j.log", f"--comment={fake}"]
    big = sb.sbatch(*common, "-A", sb.TEST_USER, "-c", "8", "--mem=64G", str(s), env=env)
    acct = sb.sbatch(*common, "-A", f"x|htc|sps|{sb.TEST_USER}", "-c", "1", "--mem=3G", str(s), env=env)
    for job in (big, acct):
        sb.wait_job_gone(job, 60)
    assert "refused by the site policy before any dask process started: memory 64G exceeds worker_mem_max=32G" \
        in job_log(big), job_log(big)
    assert f"account x|htc|sps|{sb.TEST_USER} is not allowed" in job_log(acct), job_log(acct)
    # The name comes from the uid, not from the job's environment.
    ended = {j["job_id"]: j for j in sb.agent_status(as_root=True)}
    assert ended[int(big)]["user"] == sb.TEST_USER
    assert not sb.cluster_processes(cluster_name)


def cgroups_of(pid: int) -> dict[str, str]:
    """Controller (or "" for v2) -> cgroup path, from /proc/<pid>/cgroup."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def test_5_dask_runs_in_the_jobs_cgroups_and_their_memory_limit_holds(cluster_name):
    """Slurm gives the job cgroups (proctrack/cgroup, task/cgroup). The
    dask worker is started inside them, not in the agent's, so the job's
    memory limit holds for it: a task that grabs 1 GiB in a 600 MiB job is
    killed by the kernel, inside the job, and the worker comes back."""
    import dask

    sb.forget_cluster(cluster_name)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    arr = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}", "--mem=600M")
    sb.wait_scheduler_file(cluster_name, timeout=120)
    c = sb.client(cluster_name)
    try:
        c.wait_for_workers(1, timeout=120)
        (pid,) = c.run(os.getpid).values()
        mine, agent = cgroups_of(pid), cgroups_of(sb.agent_pid())
        for controller in ("memory", "freezer"):
            assert f"/job_{arr}/" in mine[controller], (controller, mine)
            assert mine[controller] != agent[controller]
        # Slurm sets the limit on the job's and the step's cgroups; the
        # worker sits below them.
        memcg = Path("/sys/fs/cgroup/memory") / mine["memory"].lstrip("/")
        job_cg = next(p for p in [memcg, *memcg.parents] if p.name == f"job_{arr}")
        assert int((job_cg / "memory.limit_in_bytes").read_text()) == 600 << 20

        def oom_kills() -> int:
            return sum(int(dict(l.split() for l in (p / "memory.oom_control").read_text().splitlines())["oom_kill"])
                       for p in [memcg, *memcg.parents] if p == job_cg or job_cg in p.parents)

        def grab():
            b = bytearray(1 << 30)
            return len(b)

        fut = c.submit(grab, pure=False)
        sb.wait_until("the kernel to kill the worker in the job's cgroup", lambda: oom_kills() >= 1, 60)
        fut.cancel()
        c.wait_for_workers(1, timeout=60)
        assert dask.__version__  # the client still works with a worker back
    finally:
        c.close()
        sb.run(["scancel", sched, arr])


FLOOD = r"""
import json, os, socket, struct, sys, time
path, n, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hello = json.dumps({"version": version, "client": "flood"}).encode()
conns = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        break
    # A third say nothing; a third greet, announce a request of 16 KiB (the
    # cap) and send 100 bytes of it; a third announce 1 MiB (over the cap).
    # The agent waits 5 s for the first two kinds.
    sent = {0: b"", 1: struct.pack(">I", 16 << 10) + b" " * 100, 2: struct.pack(">I", 1 << 20)}[i % 3]
    try:
        if sent:
            s.sendall(struct.pack(">I", len(hello)) + hello + sent)
    except OSError:
        pass  # refused and closed by the agent: keep it open anyway
    conns.append(s)
print(len(conns), flush=True)
sys.stdin.read()
"""


def test_6_a_connection_flood_before_authentication_is_bounded(cluster_name):
    """One user opens hundreds of connections that send nothing, or only
    part of a request, or announce a 1 MiB request: the agent refuses what
    is over the per-user bound, allocates nothing for the announced frames,
    and serves others."""
    before = sb.agent_metrics()
    with AgentWatch() as w:
        flood = subprocess.Popen(["runuser", "-u", sb.TEST_USER, "--", "/usr/bin/python3", "-c", FLOOD,
                                  sb.agent_socket(), "600", str(agentproto.VERSION)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        try:
            opened = int(flood.stdout.readline())
            assert opened > 16
            # The flooding user is refused meanwhile, with the reason.
            r = sb.agent_request({"type": "ping"})
            assert r["type"] == "error" and "connections in progress" in r["message"], r
            # Others are not.
            assert agentproto.call(sb.agent_socket(), {"type": "status"})["type"] == "status"
        finally:
            flood.stdin.close()
            flood.wait(30)
        assert sb.agent_request({"type": "ping"})["type"] == "ok"
        computes(cluster_name)
    w.check()
    after = sb.agent_metrics()
    assert after["dask_spank_connections_refused_total"] > before["dask_spank_connections_refused_total"]


def fake_distributed_env(name: str, worker_module: str) -> Path:
    """A venv of the test user whose `distributed.cli.dask_worker` is ours."""
    env = sb.WORK / f"env-{name}"
    sb.as_user(["rm", "-rf", str(env)])
    sb.as_user(["/usr/bin/python3", "-m", "venv", "--without-pip", str(env)])
    site = next((env / "lib").glob("python3*/site-packages"))
    pkg = site / "distributed" / "cli"
    sb.as_user(["mkdir", "-p", str(pkg)])
    for f, text in [(site / "distributed" / "__init__.py", ""), (pkg / "__init__.py", ""),
                    (pkg / "dask_worker.py", worker_module)]:
        sb.as_user(["/usr/bin/python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                    str(f), text])
    return env


def test_7_a_fork_server_flooding_exit_reports_is_bounded(policy, cluster_name):
    """The fork server runs the user's code: it floods the agent with
    `exited` events for pids it never forked. The agent keeps none."""
    flood = (
        "import json, os, socket, time\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        s = socket.socket(fileno=os.dup(fd))\n"
        "    except OSError:\n"
        "        continue\n"
        "    if s.family == socket.AF_UNIX:\n"
        "        break\n"
        "for k in range(3000):\n"
        "    s.sendall(''.join(json.dumps({'event': 'exited', 'pid': 1000 * k + i, 'status': 0}) + '\\n'\n"
        "                      for i in range(1000)).encode())\n"
        "open(os.path.join(os.environ['HOME'], 'flood-done'), 'w').close()\n"
        "time.sleep(600)\n"
    )
    done = sb.HOME / "flood-done"
    done.unlink(missing_ok=True)
    env = fake_distributed_env(cluster_name, flood)
    # TLS off: a TLS worker would wait for its scheduler's credentials.
    policy("worker_start=forkserver tls=off")
    with AgentWatch() as w:
        job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}", f"--dask-env={env}",
                        "-o", "log/hostile-%j.log")
        sb.wait_until("the fork server to send 3 million exit reports", done.exists, 300, 0.5)
        time.sleep(1)
        sb.run(["scancel", job])
        sb.wait_job_gone(job)
    w.check()


# Starts a process at pid `pid` as soon as that pid is free: a small
# process that forks until a child gets it (root's ns_last_pid points each
# fork at it, standing in for a patient attacker cycling pids), about a
# millisecond per try. The child leads a new session (so its group id is
# its pid too), takes the given uid and gid and runs the given program.
# Prints the child's pid (or -1 after 20 s); on a line from stdin, prints
# "alive" or how the child ended; kills it when stdin closes.
PLACE = r"""
import os, signal, sys, time
pid_wanted, uid, gid = map(int, sys.argv[1:4])
argv = sys.argv[4:]
deadline, placed = time.monotonic() + 20, -1
while time.monotonic() < deadline:
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid_wanted - 1))
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.setgid(gid)
        os.setuid(uid)
        os.execv(argv[0], argv)
    if pid == pid_wanted:
        placed = pid
        break
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(placed, flush=True)
if sys.stdin.readline() and placed > 0:
    got, status = os.waitpid(placed, os.WNOHANG)
    print("alive" if got == 0 else f"ended, wait status {status:#x}", flush=True)
    sys.stdin.readline()
if placed > 0:
    try:
        os.kill(placed, signal.SIGKILL)
        os.waitpid(placed, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
"""


def place(pid: int, user: pwd.struct_passwd, argv: list[str]) -> subprocess.Popen:
    """Start placing `argv`, as `user`, at pid `pid` (PLACE). Its first
    line is the pid got (-1: not placed)."""
    return subprocess.Popen(["/usr/bin/python3", "-c", PLACE, str(pid), str(user.pw_uid), str(user.pw_gid), *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def unplace(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(30)


# A member of the worker's process group that outlives its leader by
# 100 ms after SIGTERM: the group empties while the agent is still in the
# middle of cleaning it up, the moment its id can be given to another group.
LINGER = """
import signal, time, os
signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.1), os._exit(0)))
time.sleep(600)
"""
# Its parent, started in the worker's group, leaves the worker's session
# once the member is born and reaps the member the moment it exits: the
# group id is then free (an orphan would wait for init to reap it, and
# neither a zombie nor a live process of the session lets the id go).
JOINER = """
import os, subprocess, sys
p = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
os.setsid()
print(p.pid, flush=True)
p.wait()
"""


def test_8_a_recycled_process_group_id_is_never_signalled(cluster_name):
    """The user's worker leads a process group with one more member; the
    user kills the worker. While the agent cleans up what is left of the
    group (SIGTERM, a moment, SIGKILL), the member leaves and the group
    empties. From then on the group's id could be handed to any new group
    of the node: here another user's, given exactly that id the moment it
    is free. The agent must never signal it: it keeps the leader unreaped,
    so that the id cannot be reused, until it has sent its last signal."""
    from test_nanny import start

    def spawn_lingering_member():
        # Runs in the worker (the leader of its group and session).
        import subprocess as sp
        import sys
        joiner = sp.Popen([sys.executable, "-c", JOINER, LINGER], stdout=sp.PIPE, text=True)
        return int(joiner.stdout.readline())

    other = sb.other_user()
    sched, arr, c = start(cluster_name, 1)
    placer = None
    try:
        # The agent restarts a worker's first crash of a minute at once, and
        # that restart's fork can take the freed id before the placer does
        # (seen in CI: "no process could be given the group id"). Two crashes
        # first make the measured one the third, restarted after 200 ms
        # (base 100 ms, doubled), while the placer spins on that id.
        seen = set()
        for _ in range(2):
            (addr, leader), = c.run(os.getpid).items()
            seen.add(addr)
            os.kill(leader, signal.SIGKILL)
            sb.wait_until("the worker to come back",
                          lambda: [a for a in c.scheduler_info()["workers"] if a not in seen], 60)
        (addr, leader), = c.run(os.getpid).items()
        (member,) = c.run(spawn_lingering_member).values()

        def stat(pid: int) -> list[str]:
            try:
                return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                return []

        member_stat = stat(member)
        assert member_stat[2] == str(leader), "the member is in the worker's group"
        placer = place(leader, other, ["/bin/sleep", "300"])  # spinning before the id frees
        os.kill(leader, signal.SIGKILL)
        victim = int(placer.stdout.readline())
        assert victim == leader, f"no process could be given the group id {leader}"
        # (Its pid may name another process by now: compare start times.)
        assert stat(member)[19:20] != member_stat[19:20], "the group's member outlived the cleanup"

        # The worker is restarted; then the whole cluster ends.
        sb.wait_until("the worker to come back",
                      lambda: [a for a in c.scheduler_info()["workers"] if a != addr], 60)
        assert c.submit(sum, range(10)).result(timeout=30) == 45
        c.close()
        sb.run(["scancel", arr, sched])
        sb.wait_job_gone(arr)
        sb.wait_job_gone(sched)
        time.sleep(1)
        placer.stdin.write("verdict\n")
        placer.stdin.flush()
        verdict = placer.stdout.readline().strip()
        assert verdict == "alive", f"the other user's process group {leader} was signalled: {verdict}"
    finally:
        c.close()
        if placer is not None:
            unplace(placer)


def test_9_a_fake_slurmstepd_cannot_keep_a_stale_registration(cluster_name):
    """The agent is down while a job ends; the user puts a process named
    slurmstepd at the job's old slurmstepd pid. The restarted agent must
    see that it is not the job's slurmstepd and forget the job, so that
    nothing can attach to it outside any Slurm job."""
    sb.forget_cluster(cluster_name)
    job = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    sb.wait_scheduler_file(cluster_name, timeout=60)
    state = sb.STATE / "run" / "agent" / "state-n1" / f"job-{job}.json"
    stepd = json.loads(state.read_text())["spec"]["stepd_pid"]
    os.kill(sb.agent_pid(), signal.SIGKILL)
    sb.run(["scancel", job])
    sb.wait_job_gone(job)
    sb.wait_until("the old slurmstepd to be gone", lambda: not Path(f"/proc/{stepd}").exists(), 30)
    fake_bin = sb.WORK / "slurmstepd"
    shutil.copy("/bin/sleep", fake_bin)
    shutil.chown(fake_bin, sb.TEST_USER, sb.TEST_USER)
    placer = place(stepd, sb.user(), [str(fake_bin), "300"])
    try:
        pid = int(placer.stdout.readline())
        assert pid == stepd, "could not place the fake slurmstepd"
        sb.wait_until("the fake to be named slurmstepd",
                      lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "slurmstepd", 10)
        sb.sandbox("up")
        assert int(job) not in [j["job_id"] for j in sb.agent_status(as_root=True)]
        assert not state.exists()
    finally:
        unplace(placer)


def comm(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/comm", "rb").read().rstrip(b"\n")
    except OSError:
        return b""


def real_uid(pid: int) -> int | None:
    """The real user id of `pid` (from /proc/<pid>/status, which even a
    non-dumpable process leaves readable); None once it is gone."""
    try:
        return int(proc_status(pid)["Uid"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def proc_stat(pid: int) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the name (state first); [] once
    it is gone."""
    try:
        return open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()
    except OSError:
        return []


def test_10_a_worker_named_in_invalid_utf8_and_non_dumpable_is_still_adopted(cluster_name):
    """A worker renames itself (and a process it leaves in its group) to
    bytes that are not UTF-8 and turns non-dumpable; then the agent is
    restarted. The new agent must still see the worker as the job's user's
    and adopt it (not lose it to run unsupervised beside a second one), and
    when the worker is then killed, clean its group and start it again."""
    from test_nanny import start, worker_log
    from test_restart import stop_agent, worker_pids

    def disguise_worker() -> int:
        """A task (local: cloudpickle sends it by value). Names the worker
        process in bytes that are not UTF-8, leaves a member in its process
        group named the same way, makes both non-dumpable (their /proc
        files turn root's); returns the worker's pid."""
        import ctypes
        import os
        import subprocess
        import sys
        rename = ("open('/proc/self/comm', 'wb').write(b'\\xff\\xfe-member'); "
                  "import ctypes; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
                  "print(flush=True); import time; time.sleep(600)")
        member = subprocess.Popen([sys.executable, "-c", rename], stdout=subprocess.PIPE)
        member.stdout.readline()
        # /proc/self/comm from any thread names the main thread, which is
        # what /proc/<pid>/stat shows.
        with open("/proc/self/comm", "wb") as f:
            f.write(b"\xff\xfe-worker")
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
        return os.getpid()

    sched, arr, c = start(cluster_name, 1)
    try:
        [(name, pid)] = worker_pids(c).items()
        assert c.submit(disguise_worker, pure=False).result(timeout=60) == pid
        assert comm(pid) == b"\xff\xfe-worker"
        assert os.stat(f"/proc/{pid}/status").st_uid == 0, "non-dumpable"
        # This sandbox's member: another sandbox on the machine (CI runs two)
        # may run this test at the same time, with a user of its own.
        member = next(int(p) for p in os.listdir("/proc") if p.isdigit() and comm(int(p)) == b"\xff\xfe-member"
                      and real_uid(int(p)) == sb.user().pw_uid)
        assert proc_stat(member)[2] == str(pid).encode(), "the member is in the worker's group"

        stop_agent(signal.SIGTERM)
        sb.sandbox("up")
        sb.wait_until("the worker to be adopted", lambda: f"worker adopted, pid {pid}" in worker_log(arr, 1), 30)
        assert worker_pids(c) == {name: pid}, "the same worker runs on, and only it"
        assert sb.agent_metrics()["dask_spank_lost_total"] == 0
        assert "ended while the node agent was away" not in worker_log(arr, 1)

        # The new agent supervises it: killed, its group is cleaned (the
        # member too) and it comes back.
        old = next(iter(c.scheduler_info()["workers"]))
        os.kill(pid, signal.SIGKILL)
        sb.wait_until("the lingering member of the killed worker's group to be killed",
                      lambda: proc_stat(member)[:1] in ([], [b"Z"]), 15)
        sb.wait_until("the killed worker to come back", lambda: any(
            w["name"] == name and a != old for a, w in c.scheduler_info()["workers"].items()), 60, 0.2)
        assert c.submit(sum, range(10)).result(timeout=30) == 45
    finally:
        c.close()


# Holds `n` TCP connections open to the metrics port, sending nothing: each
# one the agent closes is opened again at once. Prints n when they are
# open, and how many were opened again when its stdin closes.
METRICS_FLOOD = r"""
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
def connect():
    sel.register(socket.create_connection(("127.0.0.1", port)), selectors.EVENT_READ)
for _ in range(n):
    connect()
print(n, flush=True)
sel.register(sys.stdin, selectors.EVENT_READ)
again = 0
while True:
    for key, _ in sel.select():
        if key.fileobj is sys.stdin:
            print(again, flush=True)
            sys.exit(0)
        sel.unregister(key.fileobj)
        key.fileobj.close()
        connect()
        again += 1
"""


def scrape_seconds(port: int) -> float:
    """How long a scrape of the metrics takes (inf: none within 10 s)."""
    import urllib.request
    t0 = time.monotonic()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return float("inf")
    assert "dask_spank_build_info" in body, body
    return time.monotonic() - t0


def test_11_idle_connections_to_the_metrics_port_do_not_delay_a_scrape():
    """Any local user may connect to the metrics port: one keeps 200
    connections open there that send nothing. Scrapes (every 0.5 s for 4 s,
    through the agent closing idle ones and the user opening them again)
    are each answered within a second."""
    port = sb.METRICS_PORT_N1
    with AgentWatch() as w:
        flood = subprocess.Popen(["runuser", "-u", sb.TEST_USER, "--", "/usr/bin/python3", "-c", METRICS_FLOOD,
                                  str(port), "200"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert int(flood.stdout.readline()) == 200
            took = []
            for _ in range(8):
                took.append(scrape_seconds(port))
                time.sleep(0.5)
        finally:
            flood.stdin.close()
            again = flood.stdout.readline()
            flood.wait(30)
    w.check()
    assert max(took) < 1.0, f"scrapes took {', '.join(f'{t:.2f}' for t in took)} s"
    # The flood went on throughout: the agent closed idle ones (after 1 s).
    assert int(again) >= 200, again


# As the flooding user: open `n` connections one after another, each asking
# for `status` and not reading the reply. Prints how many got that far and
# how many were refused before, then holds them until stdin closes; then
# reads the replies and prints how many were a status and how many an
# error (with the last one).
STATUS_FLOOD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import agentproto
path, n = sys.argv[2], int(sys.argv[3])
held, refused = [], 0
for i in range(n):
    try:
        c = agentproto.Conn(path, "flood", timeout=10)
        c.send({"type": "status"})
        held.append(c)
    except (OSError, agentproto.AgentError):
        refused += 1
print(json.dumps({"held": len(held), "refused": refused}), flush=True)
sys.stdin.read()
kinds, reason = {}, ""
for c in held:
    try:
        r = c.recv()
    except (OSError, agentproto.AgentError) as e:
        r = {"type": "lost"}
    kinds[r["type"]] = kinds.get(r["type"], 0) + 1
    reason = r.get("message", reason)
print(json.dumps({"replies": kinds, "reason": reason}), flush=True)
"""

# As another user: how long a ping takes.
TIMED_PING = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import agentproto
t0 = time.monotonic()
r = agentproto.call(sys.argv[2], {"type": "ping"})
print(r["type"], time.monotonic() - t0)
"""


def other_user() -> str:
    """The second unprivileged user, made if missing (as test_nanny does)."""
    if subprocess.run(["id", sb.OTHER_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", sb.OTHER_USER], check=True)
    return sb.OTHER_USER


def test_12_unread_status_replies_are_bounded_per_user():
    """The test user has 4000 jobs on the node (registered as slurmstepd
    would, for a long cluster name), so that its `status` is about a
    megabyte, and opens 1000 connections asking for it without reading a
    reply. The agent must hold no more than a few of those replies (the
    others are refused, saying why): its memory grows by less than 40 MiB,
    and root and another user are answered within a second meanwhile."""
    import bench_control
    u = sb.user()
    sock = sb.agent_socket()
    root = bench_control.Agent(sock)
    cluster = "status-flood-" + "x" * 51
    first = 7_000_000
    ids = range(first, first + 4000)
    try:
        for i, job in enumerate(ids):
            spec = bench_control.spec(i, u, os.getpid())
            spec.update(job_id=job, array_job_id=first, node="n1", cluster=cluster)
            assert root.call(spec)["type"] == "ok"
        size = len(json.dumps(sb.agent_status()))
        assert size > 900_000, size
        scripts = str(sb.REPO / "scripts")
        other = other_user()
        with AgentWatch() as w:
            flood = subprocess.Popen(["runuser", "-u", sb.TEST_USER, "--", "/usr/bin/python3", "-c", STATUS_FLOOD,
                                      scripts, sock, "1000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                out = json.loads(flood.stdout.readline())
                pings = []
                for _ in range(3):
                    p = subprocess.run(["runuser", "-u", other, "--", "/usr/bin/python3", "-c", TIMED_PING,
                                        scripts, sock], capture_output=True, text=True, timeout=30)
                    kind, took = p.stdout.split()
                    assert kind == "ok", p.stdout + p.stderr
                    pings.append(float(took))
                    time.sleep(0.5)
            finally:
                flood.stdin.close()
                got = json.loads(flood.stdout.readline() or "{}")
                flood.wait(60)
        print(out, got, f"agent RSS {w.rss0:.0f} -> {w.rss_max:.0f} MiB, other user's pings {pings}")
        w.check()
        assert max(pings) < PING_BOUND_S, pings
        # A few megabytes of status in flight, the rest refused, saying why.
        assert out["held"] + out["refused"] == 1000
        assert got["replies"].get("status", 0) <= 5, got
        assert "bytes of replies from the node agent not read yet" in got["reason"], got
    finally:
        for job in ids:
            root.call({"type": "job_end", "job_id": job, "reason": "test over"})
