"""Helpers shared by scripts/demo and the integration tests: run commands as
the sandbox's test user, submit and watch Slurm jobs, find dask processes.

Everything here talks to the real sandbox (scripts/sandbox): real Slurm,
real node agent, real dask.
"""
from __future__ import annotations

import functools
import json
import pwd
import subprocess
import time
from pathlib import Path

import agentproto

import sandbox as _box
from sandbox import Sandbox

# The sandbox's places, ports and names (scripts/sandbox.py has them from
# scripts/lib.sh, where each rule is stated).
REPO, STATE, CTLD_PORT = _box.REPO, _box.STATE, _box.CTLD_PORT
SLURM_RELEASE, HOST_SLURM = _box.SLURM_RELEASE, _box.HOST_SLURM
TEST_USER, OTHER_USER, HOME, WORK = _box.TEST_USER, _box.OTHER_USER, _box.HOME, _box.WORK
VENV, BIN, LOGS = _box.VENV, _box.BIN, _box.LOGS
# The node agent of n1 serves its metrics over HTTP on loopback here.
METRICS_PORT_N1 = _box.metrics_port(1)
ENV = _box.env()


def sandbox(cmd: str) -> None:
    """`up` (with the settings kept) or `down`, in this process."""
    box = Sandbox()
    {"up": box.up, "down": box.down}[cmd]()


def run(args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run a command as root with the sandbox environment."""
    return subprocess.run(args, env=ENV, text=True, capture_output=True, check=check, **kw)


def user_command(args, cwd: Path | None = None, env: dict | None = None) -> list[str]:
    """The command line that runs `args` as the unprivileged test user, with
    the environment a user's shell would have (plus `env`)."""
    base = {
        "HOME": str(HOME), "USER": TEST_USER, "LOGNAME": TEST_USER,
        "SLURM_CONF": ENV["SLURM_CONF"],
        "PATH": f"{VENV}/bin:{BIN}:/usr/local/bin:/usr/bin:/bin",
    }
    base.update(env or {})
    return ["runuser", "-u", TEST_USER, "--", "env", "-C", str(cwd or WORK),
            *(f"{k}={v}" for k, v in base.items()), *args]


def as_user(args, check=True, cwd: Path | None = None, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    """Run a command as the unprivileged test user, like a user's shell would."""
    return subprocess.run(user_command(args, cwd, env), text=True, capture_output=True, check=check, **kw)


def user() -> pwd.struct_passwd:
    return pwd.getpwnam(TEST_USER)


def other_user() -> pwd.struct_passwd:
    """The second unprivileged user (OTHER_USER), made on first use."""
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", OTHER_USER], check=True)
        return pwd.getpwnam(OTHER_USER)


def sbatch(*args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    """Submit as the test user; return the job id (the array id for arrays)."""
    p = as_user(["sbatch", "--parsable", *args], cwd=cwd, env=env, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]


def squeue_ids() -> list[str]:
    out = run(["squeue", "-h", "-o", "%i"]).stdout
    return [x for x in out.split() if x]


def job_states(job: str) -> dict[str, str]:
    """Job (or array task) id -> state, from squeue (jobs still known)."""
    out = run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], check=False).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def scontrol_job(job: str) -> dict[str, str]:
    out = run(["scontrol", "-o", "show", "job", job]).stdout.splitlines()[0]
    fields = {}
    for tok in out.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            fields[k] = v
    return fields


def wait_until(what: str, pred, timeout: float = 60.0, interval: float = 0.2):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@functools.lru_cache(maxsize=None)
def layout(name: str) -> dict[str, str]:
    """Where the test user's cluster `name` keeps its files, from the CLI
    (`dask-spank layout`, the one definition of that layout)."""
    return json.loads(as_user([str(BIN / "dask-spank"), "layout", name]).stdout)


def cluster_dir(name: str) -> Path:
    return Path(layout(name)["cluster_dir"])


def scheduler_file(name: str) -> Path:
    return Path(layout(name)["scheduler_file"])


def sandbox_uids() -> set[int]:
    """The users whose processes are this sandbox's: its two test users,
    and root (a dask process as root would be a bug to see). Another
    sandbox on the machine has test users of its own (CI runs two side
    by side), whose processes may carry the same cluster names."""
    uids = {0}
    for name in (TEST_USER, OTHER_USER):
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    return uids


def dask_processes(uid: int | None = None) -> list[dict]:
    """Live dask scheduler/worker processes of this sandbox's users
    (`sandbox_uids`), or of one uid, from /proc."""
    procs, ours = [], sandbox_uids()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            environ = (d / "environ").read_bytes().split(b"\0")
            # A process may name itself in bytes that are not UTF-8.
            status = (d / "status").read_bytes().decode(errors="replace")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd if a]
        # The agent starts them as `python3 -c BOOT dask-worker|dask-scheduler`.
        if not any(a in ("dask-worker", "dask-scheduler", "distributed.cli.dask_worker",
                         "distributed.cli.dask_scheduler") for a in args):
            continue
        st = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        st = {k: v.strip() for k, v in st.items()}
        if st.get("State", "").startswith("Z"):
            continue
        p = {
            "pid": int(d.name),
            "args": args,
            "uid": [int(x) for x in st["Uid"].split()],
            "gid": [int(x) for x in st["Gid"].split()],
            "groups": [int(x) for x in st.get("Groups", "").split()],
            "CapEff": st.get("CapEff"),
            "CapPrm": st.get("CapPrm"),
            "NoNewPrivs": st.get("NoNewPrivs"),
            "role": "scheduler" if {"dask-scheduler", "distributed.cli.dask_scheduler"} & set(args) else "worker",
        }
        if "--name" in args:
            p["name"] = args[args.index("--name") + 1]
        # Its cluster, from its job's environment (the plugin sets it; the
        # command line names no path since the scheduler file moved to the
        # environment).
        cluster = next((e[len(b"DASK_SPANK_CLUSTER="):] for e in environ if e.startswith(b"DASK_SPANK_CLUSTER=")), b"")
        p["cluster"] = cluster.decode(errors="replace")
        if p["uid"][0] == uid or (uid is None and p["uid"][0] in ours):
            procs.append(p)
    return procs


def cluster_processes(cluster: str) -> list[dict]:
    """The live dask processes of one cluster (dask_processes)."""
    return [p for p in dask_processes() if p["cluster"] == cluster]


def cancel_all_user_jobs(timeout: float = 60.0) -> None:
    run(["scancel", "-u", TEST_USER], check=False)
    wait_until("the test user's jobs to end", lambda: not any(
        True for _ in run(["squeue", "-h", "-u", TEST_USER, "-o", "%i"]).stdout.split()), timeout)


def security(name: str):
    """The cluster's TLS credentials, as the test user's own processes use
    them (root reads them here: this is the test harness)."""
    from distributed.security import Security
    from dask_spank.cluster import ClusterSecurity
    d = cluster_dir(name)
    if (d / "tls.pem").exists():
        return ClusterSecurity(tls_ca_file=str(d / "ca.pem"), tls_client_cert=str(d / "tls.pem"),
                               tls_client_key=str(d / "tls.key"), require_encryption=True)
    return Security()


def client(name: str, timeout: float = 30):
    """A distributed.Client connected through the cluster's scheduler file,
    with the cluster's credentials."""
    from distributed import Client
    return Client(scheduler_file=str(scheduler_file(name)), timeout=timeout, security=security(name))


def plain_cluster_computes(name: str) -> tuple[str, str]:
    """A cluster started with plain sbatch (a scheduler job, an array of 2
    worker jobs) computes a sum with both workers connected; returns its
    scheduler job and worker array (left running)."""
    import dask.array as da
    forget_cluster(name)
    sched = sbatch("--dask-role=scheduler", f"--dask-cluster={name}")
    arr = sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2")
    wait_scheduler_file(name)
    c = client(name)
    try:
        c.wait_for_workers(2, timeout=120)
        assert int(da.arange(10_000, chunks=1000).sum().compute()) == 49_995_000
    finally:
        c.close()
    return sched, arr


def scheduler_dropped(cluster: str, since: float) -> list[str]:
    """Names of the worker logs of `cluster` written since `since` (a
    time.time(); older runs of a test leave logs of the same cluster name)
    whose worker stopped because its scheduler connection broke while the
    scheduler ran. What CPython issue 148594 did under Python 3.14 (Slurm
    26.05's sandbox) before the workaround (python/dask_spank/tls_eof.py):
    a write to a worker that had just left closed other, live workers'
    connections. Tests assert that it no longer happens."""
    out = []
    for p in (WORK / "log").glob("dask-worker-*.log"):
        if p.stat().st_mtime < since:
            continue
        text = p.read_text(errors="replace")
        if f"of cluster '{cluster}'" in text and "worker-handle-scheduler-connection-broken" in text:
            out.append(p.name)
    return sorted(out)


def forget_cluster(name: str, credentials: bool = False) -> None:
    """Remove what an earlier cluster of the same name left (scheduler file,
    state record, job reports), as `dask-spank down` does, so that waiting
    for the scheduler file waits for the new scheduler. With `credentials`,
    its TLS credentials too (`down` keeps them), which a client of a new
    TCP cluster of that name would otherwise take, and refuse plain TCP."""
    import shutil
    for key, path in layout(name).items():
        if key == "jobs_dir" or Path(path).is_dir() and key != "cluster_dir":
            shutil.rmtree(path, ignore_errors=True)
        elif key != "cluster_dir" and (credentials or not key.startswith("tls_")):
            Path(path).unlink(missing_ok=True)


def wait_scheduler_file(name: str, timeout: float = 60.0) -> dict:
    f = scheduler_file(name)
    wait_until(f"{f}", lambda: f.exists() and f.stat().st_size > 0, timeout)
    return json.loads(f.read_text())


def connected_workers(c) -> dict:
    """The workers the scheduler has now (address -> info), asked of it
    directly. Not `Client.scheduler_info()`: it fetches into a cache that
    the client's own 2-second refresh overwrites without the workers
    (n_workers=0), and a refresh landing between its fetch and its return
    reads as no worker at all (a CI run on 24.11, 2026-12-06: one 0 among
    samples of 4 to 8 while the scheduler never had fewer than 4)."""
    return c.sync(c.scheduler.identity, n_workers=-1)["workers"]


def worker_names(c) -> set[str]:
    return {w.get("name") for w in connected_workers(c).values()}


def set_policy(args: str) -> None:
    """Run the sandbox with extra plugstack.conf policy keys ("" for none).
    Restarts slurmd when plugstack.conf changes."""
    Sandbox().up(policy=args)


def set_site(args: str | None) -> None:
    """The site's policy keys: None for the sandbox's default (the example
    site policy, packaging/examples/cc-in2p3.conf), "" for none at all (a
    site-neutral line). Restarts slurmd when plugstack.conf changes."""
    Sandbox().up(site=args)


def health_check(on: bool) -> None:
    """The nodes' health check on or off (off: a dead agent does not get
    its node drained, for tests of what a job then sees)."""
    Sandbox().set_health_check(on)


def wait_job_gone(job: str, timeout: float = 60.0) -> None:
    wait_until(f"job {job} to end", lambda: not job_states(job), timeout)


def agent_status(as_root: bool = False) -> list[dict]:
    """The node agent's job table (`dask-node-agent status --json`)."""
    args = [str(BIN / "dask-node-agent"), "status", "--json",
            "--agent-dir", str(STATE / "run" / "agent"), "--node", "n1"]
    p = run(args) if as_root else as_user(args)
    return json.loads(p.stdout)


def agent_metrics() -> dict[str, int]:
    """The node agent's metrics (`dask-node-agent metrics`, as root)."""
    text = run([str(BIN / "dask-node-agent"), "metrics", "--agent-dir",
                str(STATE / "run" / "agent"), "--node", "n1"]).stdout
    return {k: int(v) for k, v in (l.rsplit(" ", 1) for l in text.splitlines() if l and not l.startswith("#"))
            if "{" not in k}


def agent_speaks(version: int) -> bool:
    """Whether node n1's agent accepts a peer of this protocol version."""
    try:
        c = agentproto.Conn(agent_socket(), "version-probe", timeout=10, version=version)
    except agentproto.AgentError:
        return False
    ok = c.call({"type": "ping"}).get("type") == "ok"
    c.close()
    return ok


def agent_pid() -> int:
    return int((STATE / "run" / "agent-n1.pid").read_text())


def job_state(job: str) -> str:
    """JobState from scontrol (works for a while after the job ended)."""
    return scontrol_job(job).get("JobState", "")


def agent_socket(node: str = "n1") -> str:
    return str(STATE / "run" / "agent" / f"agent-{node}.sock")


def agent_request(request: dict, user: str | None = None) -> dict:
    """Send one request to the node agent as `user` (default: the test user)."""
    args = agentproto.as_command("call", agent_socket(), json.dumps(request))
    if user is None:
        p = as_user(args)
    else:
        p = subprocess.run(["runuser", "-u", user, "--", *args], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def sandbox_up(**settings) -> None:
    """Bring the sandbox up with these settings changed (scripts/sandbox.py's
    `Settings`: nodes, cpus, accounting, site, policy, plugstack_include,
    health_check); the others as they were."""
    Sandbox().up(**settings)


def agent_status_of(node: str) -> list[dict]:
    args = [str(BIN / "dask-node-agent"), "status", "--json",
            "--agent-dir", str(STATE / "run" / "agent"), "--node", node]
    return json.loads(run(args).stdout)
