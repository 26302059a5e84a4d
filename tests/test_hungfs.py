"""The root node agent never waits on a user's file system (issue 24).

The test user mounts a FUSE file system of its own (tests/hangfs.py, through
fusermount3, as any user of a site can) and freezes its daemon (SIGSTOP).
Jobs of that user then hand the agent that file system as their log, their
working directory or their --dask-env. Meanwhile a watcher pings the agent
every 100 ms (each answer within 0.1 s) and another user's cluster starts and
computes on the same node. Each stuck job fails with a reason naming the
path, within the agent's start timeout (the sandbox's: 10 s); once the
daemon is killed, nothing of those jobs is left.

A site's own file system that hangs (a dead NFS server; here a FUSE mount of
root's, which the agent accepts as a log) must not silence the lifecycle
lines of any other job, however many jobs write there.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import sandboxlib as sb
from test_hostile import AgentWatch

# The sandbox's --start-timeout (scripts/sandbox).
START_TIMEOUT_S = 10
# Every ping answered within this, throughout.
PING_BOUND_S = 0.1


def flag(name: str) -> Path:
    return sb.HOME / f"hungfs-{name}"


# The job script: Python, so that nothing but the steps asked for touches
# the file system once it is frozen (bash stats its working directory now
# and then). It takes its hold on the file system while it answers (`hold`:
# a chdir, or a descriptor opened there as fd 3), says so, waits for the
# go, then attaches: with `dask-spank attach`, or, to hand over fd 3 as the
# job's log, with a small client of the attach protocol of its own
# (scripts/agentproto.py; `dask-spank attach` would hang on its own
# standard output first, in the user's process, before reaching the agent).
JOB = """#!/usr/bin/python3
import os, sys, time
{hold}
open({ready!r}, "w").close()
while not os.path.exists({go!r}):
    time.sleep(0.1)
if {own_client!r}:
    sys.path.insert(0, {work!r})
    import agentproto
    try:
        c = agentproto.attach(os.environ["DASK_SPANK_AGENT_SOCKET"], int(os.environ["SLURM_JOB_ID"]),
                              {cluster_dir!r}, 3)
    except agentproto.AgentError as e:
        print("dask-spank attach: " + str(e), file=sys.stderr, flush=True)
        os._exit(1)
    while c.recv().get("type") != "finished":
        pass
    os._exit(0)
os.execvp("dask-spank", ["dask-spank", "attach"])
"""


def hung_job(fs, name: str, hold: str, own_client: bool, cluster: str, *sbatch_args: str) -> str:
    """Submit, where the mount is, a worker job of the test user (JOB)."""
    log_dir()
    flag(f"ready-{name}").unlink(missing_ok=True)
    flag(f"go-{name}").unlink(missing_ok=True)
    proto = sb.WORK / "agentproto.py"
    proto.write_text((sb.REPO / "scripts" / "agentproto.py").read_text())
    script = sb.WORK / f"hungfs-{name}.py"
    script.write_text(JOB.format(hold=hold, ready=str(flag(f"ready-{name}")), go=str(flag(f"go-{name}")),
                                 own_client=own_client, work=str(sb.WORK), cluster_dir=str(sb.cluster_dir(cluster))))
    for f in (proto, script):
        os.chmod(f, 0o755)
        os.chown(f, sb.user().pw_uid, sb.user().pw_gid)
    p = fs.run(["sbatch", "--parsable", "-o", f"log/hungfs-{name}-%j.log", "--dask-role=worker",
                f"--dask-cluster={cluster}", *sbatch_args, str(script)])
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def log_dir() -> None:
    """The test user's log directory, which the jobs' -o names."""
    sb.as_user(["mkdir", "-p", str(sb.WORK / "log")])


def metric(name: str) -> int:
    """One of the agent's metrics (0 for an agent without it)."""
    return sb.agent_metrics().get(f"dask_spank_{name}", 0)


def slurm_log(name: str, job: str) -> str:
    f = sb.WORK / "log" / f"hungfs-{name}-{job}.log"
    return f.read_text(errors="replace") if f.exists() else ""


def agent_job(job: str) -> dict:
    return next((j for j in sb.agent_status(as_root=True) if str(j["job_id"]) == job), {})


# --- another user's cluster -------------------------------------------------

OTHER_HOME = sb.STATE / "home" / sb.OTHER_USER


def as_other(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command as the second user, in a home of its own."""
    u = sb.other_user()
    (OTHER_HOME / "log").mkdir(parents=True, exist_ok=True)
    for d in (OTHER_HOME, OTHER_HOME / "log"):
        os.chown(d, u.pw_uid, u.pw_gid)
    env = {"HOME": str(OTHER_HOME), "USER": u.pw_name, "LOGNAME": u.pw_name, "SLURM_CONF": sb.ENV["SLURM_CONF"],
           "PATH": f"{sb.VENV}/bin:{sb.BIN}:/usr/local/bin:/usr/bin:/bin"}
    cmd = ["runuser", "-u", u.pw_name, "--", "env", "-C", str(OTHER_HOME),
           *[f"{k}={v}" for k, v in env.items()], *args]
    return subprocess.run(cmd, text=True, capture_output=True, check=check)


def other_users_cluster_computes(name: str) -> float:
    """The second user starts a cluster on the node and computes a verified
    result with it; the seconds it took from submission to the result."""
    from distributed import Client
    from dask_spank.cluster import ClusterSecurity

    t0 = time.monotonic()
    layout = json.loads(as_other([str(sb.BIN / "dask-spank"), "layout", name]).stdout)
    d = Path(layout["cluster_dir"])
    as_other(["rm", "-f", layout["scheduler_file"]])
    as_other(["sbatch", "--parsable", "--dask-role=scheduler", f"--dask-cluster={name}"])
    as_other(["sbatch", "--parsable", "--dask-role=worker", f"--dask-cluster={name}"])
    sb.wait_until("the other user's scheduler", lambda: Path(layout["scheduler_file"]).exists(), 120)
    security = None
    if (d / "tls.pem").exists():
        security = ClusterSecurity(tls_ca_file=str(d / "ca.pem"), tls_client_cert=str(d / "tls.pem"),
                                   tls_client_key=str(d / "tls.key"), require_encryption=True)
    c = Client(scheduler_file=layout["scheduler_file"], timeout=30, security=security)
    try:
        c.wait_for_workers(1, timeout=120)
        assert c.submit(sum, range(1000)).result(timeout=60) == 499500
        return time.monotonic() - t0
    finally:
        c.close()
        sb.run(["scancel", "-u", sb.OTHER_USER], check=False)


# --- the tests ----------------------------------------------------------------

CASES = {
    # The job's log is a file on the frozen file system.
    "stdout": dict(hold='os.dup2(os.open("{mnt}/log", os.O_WRONLY | os.O_APPEND), 3)', own_client=True, args=[],
                   path="{mnt}/log"),
    # Its working directory is there.
    "cwd": dict(hold='os.chdir("{mnt}/dir")', own_client=False, args=[], path="{mnt}/dir"),
    # Its --dask-env is there.
    "env": dict(hold="", own_client=False, args=["--dask-env={mnt}/env"], path="{mnt}/env/bin/python"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_users_frozen_file_system_stops_only_their_job(policy, hung_fs, case):
    # TLS off: a TLS worker would wait for its scheduler's credentials.
    policy("tls=off")
    mnt = str(hung_fs.mount)
    c = CASES[case]
    name = f"{case}-{os.getpid()}"
    job = hung_job(hung_fs, name, c["hold"].format(mnt=mnt), c["own_client"], f"hungfs-{case}",
                   *[a.format(mnt=mnt) for a in c["args"]])
    sb.wait_until("the job to hold the file system", flag(f"ready-{name}").exists, 60)
    path = c["path"].format(mnt=mnt)
    with AgentWatch() as w:
        hung_fs.freeze()
        t0 = time.monotonic()
        flag(f"go-{name}").touch()
        computed_in = other_users_cluster_computes(f"hungfs-other-{case}")
        reason = sb.wait_until("the stuck job to fail with its reason",
                               lambda: (agent_job(job).get("state") in ("failed", "refused")
                                        and agent_job(job).get("reason")), START_TIMEOUT_S + 50)
        failed_after = time.monotonic() - t0
    w.check(bound=PING_BOUND_S)
    assert path in reason, reason
    assert failed_after < START_TIMEOUT_S + 10, f"the job failed after {failed_after:.1f}s"
    # The user reads it in the job's own log too.
    sb.wait_until("the reason in the job's Slurm log", lambda: path in slurm_log(name, job), 30)
    print(f"{case}: failed after {failed_after:.1f}s ({reason}); the other user's cluster computed in "
          f"{computed_in:.1f}s; slowest ping {w.worst * 1000:.0f} ms")

    # The daemon dies: everything of the job goes.
    hung_fs.kill()
    sb.run(["scancel", job], check=False)
    sb.wait_job_gone(job, 60)
    sb.wait_until("no start left stuck", lambda: metric("starts_stuck") == 0, 30)
    sb.wait_until("no user I/O thread left", lambda: metric("user_io_threads") == 0, 30)
    assert not sb.dask_processes(sb.user().pw_uid)
    sb.wait_until("no process of the test user left", lambda: not user_processes(), 30)


def user_processes() -> list[str]:
    """The test user's processes, but the FUSE daemon (killed, reaped by
    the fixture) and zombies."""
    uid = sb.user().pw_uid
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            # Any process may name itself in bytes that are not UTF-8.
            st = (d / "status").read_bytes().decode(errors="replace")
            comm = (d / "comm").read_bytes().decode(errors="replace").strip()
        except OSError:
            continue
        fields = dict(l.split(":", 1) for l in st.splitlines() if ":" in l)
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            out.append(f"{d.name} {comm}")
    return out


@pytest.mark.parametrize("hung_fs", [{"as_root": True}], indirect=True)
def test_jobs_whose_logs_hang_do_not_silence_another_jobs_lines(policy, hung_fs, cluster_name):
    """18 running worker jobs log to a site's file system (root's FUSE
    mount: the agent accepts it, as it accepts NFS), which then stops
    answering; the jobs are cancelled, so the agent has lines for each of
    them ("stopping worker ..."): they hang, each on a thread of the user's
    budget. Another job's lifecycle lines still reach its log at once."""
    policy("tls=off")
    log_dir()
    n = 18
    script = sb.WORK / f"hungfs-logs-{os.getpid()}.py"
    # Each task of the array: its log, on that file system, as stdout.
    script.write_text(f"""#!/usr/bin/python3
import os
task = os.environ["SLURM_ARRAY_TASK_ID"]
os.dup2(os.open("{hung_fs.mount}/log-" + task, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 1)
os.execvp("dask-spank", ["dask-spank", "attach"])
""")
    os.chmod(script, 0o755)
    os.chown(script, sb.user().pw_uid, sb.user().pw_gid)
    p = hung_fs.run(["sbatch", "--parsable", f"--array=1-{n}", "-o", "log/hungfs-logs-%A_%a.log",
                     "--dask-role=worker", f"--dask-cluster={cluster_name}-hung", str(script)])
    assert p.returncode == 0, p.stderr
    arr = p.stdout.strip().split(";")[0]

    def running() -> int:
        return sum(1 for j in sb.agent_status(as_root=True)
                   if j["cluster"] == f"{cluster_name}-hung" and j["state"] == "running")

    sb.wait_until(f"{n} workers to run", lambda: running() == n, 180, 1)
    with AgentWatch() as w:
        hung_fs.freeze()
        sb.run(["scancel", arr])
        if "dask_spank_user_io_threads" in sb.agent_metrics():
            sb.wait_until(f"the agent's lines to the {n} logs to hang", lambda: metric("user_io_threads") >= n, 60)
        else:
            time.sleep(10)  # an agent without the metric: its writers hang by now
        # Another job of the same user, its log on the ordinary file system.
        other = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}-fine", "-o", "log/hungfs-fine-%j.log")
        log = sb.WORK / "log" / f"hungfs-fine-{other}.log"
        t0 = time.monotonic()
        sb.wait_until("the other job's lifecycle lines", lambda: log.exists() and "worker started, pid" in log.read_text(), 60)
        took = time.monotonic() - t0
        assert f"worker job {other} of cluster '{cluster_name}-fine'" in log.read_text()
        stuck = metric("user_io_threads")
    w.check(bound=PING_BOUND_S)
    print(f"with {stuck} user I/O threads hung, another job's lines came {took:.1f}s after its submission; "
          f"slowest ping {w.worst * 1000:.0f} ms")
    assert stuck >= n
    hung_fs.kill()
    sb.run(["scancel", other], check=False)
    sb.wait_job_gone(arr, 60)
    sb.wait_until("no user I/O thread left", lambda: metric("user_io_threads") == 0, 30)
    sb.wait_until("no start left stuck", lambda: metric("starts_stuck") == 0, 30)


@pytest.mark.parametrize("hung_fs", [{"allow_other": True}], indirect=True)
def test_the_sandboxs_take_over_never_stats_through_a_link_to_a_frozen_mount(hung_fs):
    """scripts/sandbox.py gives a former test user's files to the current one
    at every start, walking the work directory as root. A link there to a
    frozen file system that root reaches (os.walk's is_dir() stats a link's
    target) must not hang that walk, nor so the sandbox's start."""
    top = sb.WORK / f"takeover-{os.getpid()}"
    hung_fs.run(["mkdir", "-p", str(top / "dir")]).check_returncode()
    hung_fs.run(["ln", "-sfn", str(hung_fs.mount / "dir"), str(top / "dir" / "link")]).check_returncode()
    assert hung_fs.run(["test", "-d", str(top / "dir" / "link")]).returncode == 0, "the link does not reach the mount"
    pw = sb.user()
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import sandbox; "
            "print(sandbox.take_over(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))")
    hung_fs.freeze()
    walk = hung_fs.popen([str(sb.VENV / "bin" / "python3"), "-c", code, str(sb.REPO / "scripts"), str(top),
                          str(pw.pw_uid), str(pw.pw_gid)], user=False,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = walk.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        walk.kill()
        pytest.fail(f"take_over({top}) still walking after 20 s: it waits on the frozen mount behind {top}/dir/link")
    finally:
        hung_fs.kill()
        walk.wait(10)
        hung_fs.run(["rm", "-rf", str(top)])
    assert walk.returncode == 0 and out.strip() == "0", (out, err)
