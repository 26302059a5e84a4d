"""The dask-spank user command on the sandbox: every subcommand, human and
--json output, readiness and failure reasons."""
import json
import re
import subprocess
import time

import sandboxlib as sb


def ds(*args, check=True, timeout=300):
    return sb.as_user(["dask-spank", *args], check=check, timeout=timeout)


def connected(name):
    c = sb.client(name)
    n = len(c.scheduler_info()["workers"])
    c.close()
    return n


def test_help_is_clear_and_shows_examples():
    out = ds("--help").stdout
    assert "Dask clusters as Slurm jobs" in out and "Examples:" in out
    for sub in ["up", "ls", "status", "wait", "scale", "logs", "down", "attach"]:
        assert sub in out
        h = ds(sub, "--help").stdout
        assert "Example" in h, sub


def test_up_wait_status_ls_logs_down(cluster_name):
    name = cluster_name
    p = ds("up", name, "--workers", "2", "--worker-mem", "2G", "--wait", "100", "--timeout", "180")
    assert f"cluster '{name}': scheduler job" in p.stdout
    assert f"client = connect(\"{name}\")" in p.stdout and f"scheduler file: {sb.scheduler_file(name)}" in p.stdout
    assert f"cluster '{name}': 2 of 2 worker jobs connected (100%)" in p.stdout
    assert connected(name) == 2

    st = json.loads(ds("status", name, "--json").stdout)
    assert st["connected"] == 2 and st["pending"] == 0 and st["failed"] == 0
    assert st["scheduler"]["state"] == "running"
    assert st["scheduler_address"].startswith("tls://127.0.0.1:")
    assert [w["state"] for w in st["workers"]] == ["connected", "connected"]
    human = ds("status", name).stdout
    assert f"cluster '{name}': 2 of 2 worker jobs connected" in human
    assert "JOB          ROLE       STATE      NODE      REASON" in human
    sched = st["scheduler"]["job"]
    assert sb.scontrol_job(sched)["MinMemoryNode"] == "1G"
    assert sb.scontrol_job(st["workers"][0]["job"])["MinMemoryNode"] == "2G"

    ls = json.loads(ds("ls", "--json").stdout)
    mine = [c for c in ls if c["cluster"] == name]
    assert mine and mine[0]["connected"] == 2 and mine[0]["workers"] == 2
    assert name in ds("ls").stdout

    logs = ds("logs", name, "--job", st["workers"][0]["job"]).stdout
    assert f"==> {st['workers'][0]['job']}:" in logs and "worker started, pid" in logs

    p = ds("up", name, "--workers", "1", check=False)
    assert p.returncode != 0 and f"dask-spank: cluster '{name}' is already in use by jobs" in p.stderr

    out = ds("down", name).stdout
    assert f"cluster '{name}' is down: 3 jobs cancelled, none left in the queue" in out
    # Nothing of it steers a later cluster of the name (its keeper would
    # read "down" and keep nothing).
    left = sorted(p.name for p in sb.cluster_dir(name).iterdir())
    assert not {"target.json", "keeper.json", "state.json", "scheduler.json", "jobs"} & set(left), left
    assert not sb.run(["squeue", "-h", "-n", f"dask-worker-{name},dask-scheduler-{name}"]).stdout.strip()
    sb.wait_until("no dask process of the cluster", lambda: not sb.cluster_processes(name), 20)


def test_wait_percent_returns_at_half_and_not_earlier(cluster_name):
    name = cluster_name
    sb.forget_cluster(name)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}")
    held = [sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--hold") for _ in range(2)]
    sb.wait_scheduler_file(name)
    # --percent 0 returns at once.
    t0 = time.monotonic()
    ds("wait", name, "--percent", "0")
    assert time.monotonic() - t0 < 5
    w = subprocess.Popen(
        ["runuser", "-u", sb.TEST_USER, "--", "env", "-C", str(sb.WORK), f"HOME={sb.HOME}", f"USER={sb.TEST_USER}",
         f"SLURM_CONF={sb.ENV['SLURM_CONF']}", f"PATH={sb.VENV}/bin:{sb.BIN}:/usr/bin:/bin",
         "dask-spank", "wait", name, "--percent", "50", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    assert w.poll() is None, ("wait returned before any worker was connected", w.communicate())
    sb.run(["scontrol", "release", held[0]])
    out, err = w.communicate(timeout=120)
    assert w.returncode == 0, err
    assert f"cluster '{name}': 1 of 2 worker jobs connected (50%), 1 pending" in out
    assert connected(name) == 1
    # Plain lines when not on a terminal.
    assert "dask-spank: 0 of 2 worker jobs connected (0%), 2 pending" in err
    # A timeout names what the pending job waits for.
    p = ds("wait", name, "--percent", "100", "--timeout", "3", check=False)
    assert p.returncode != 0
    assert "timed out after 3s: 1 of 2 worker jobs connected (50%), 1 pending (wanted 100%)" in p.stderr
    assert "pending jobs wait for: JobHeldUser" in p.stderr
    sb.run(["scancel", sched, *held])


def test_status_and_wait_report_a_failed_worker(cluster_name):
    name = cluster_name
    sb.forget_cluster(name)
    env = sb.WORK / "env-without-distributed"
    if not (env / "bin" / "python").exists():
        sb.as_user(["/usr/bin/python3", "-m", "venv", "--without-pip", str(env)])
    # A scheduler without a target (not `up --workers 0`, whose keeper
    # would hold 0 workers and cancel the one submitted here).
    sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}")
    sb.wait_scheduler_file(name)
    job = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", f"--dask-env={env}")
    p = ds("wait", name, "--percent", "100", "--timeout", "120", check=False)
    assert p.returncode != 0
    assert "only 0 of 1 worker jobs are left, fewer than 100%" in p.stderr
    assert "gave up after 5 crashes within 60s" in p.stderr
    sb.wait_job_gone(job)
    st = json.loads(ds("status", name, "--json").stdout)
    row = [w for w in st["workers"] if w["job"] == job][0]
    assert row["state"] == "failed"
    assert "worker died (exit code 1); gave up after 5 crashes within 60s; not restarting" in row["reason"]
    assert "failed" in ds("status", name).stdout
    ds("down", name)


def test_scale_up_and_down_changes_connected_workers(cluster_name):
    name = cluster_name
    ds("up", name, "--workers", "1", "--wait", "100", "--timeout", "120")
    out = ds("scale", name, "3").stdout
    assert f"cluster '{name}': target 3 worker jobs (it has 1)" in out
    # The scheduler job's keeper submits them.
    sb.wait_until("3 connected workers", lambda: connected(name) == 3, 120, 1)
    out = ds("scale", name, "1").stdout
    assert f"cluster '{name}': target 1 worker jobs (it has 3)" in out
    sb.wait_until("2 workers to leave", lambda: connected(name) == 1, 60)
    # The state record follows within a few seconds (refreshed every 2 s).
    st = sb.wait_until("status to show 1 connected and 2 ended workers",
                       lambda: (lambda s: s if (s["connected"], s["ended"]) == (1, 2) else None)(
                           json.loads(ds("status", name, "--json").stdout)), 30)
    assert st["pending"] == 0
    ds("down", name)



def test_errors_are_clear(cluster_name):
    p = ds("status", "no-such-cluster", check=False)
    assert p.returncode != 0
    assert "dask-spank: unknown cluster 'no-such-cluster': no job and no record of it" in p.stderr
    p = ds("wait", "bad/name", check=False)
    assert p.returncode != 0 and "--dask-cluster=bad/name: may only contain" in p.stderr
    # sbatch's (here the plugin's) own message reaches the user, before any
    # job: no scheduler job is submitted (then cancelled). squeue -t all
    # also lists the jobs that ended lately.
    def scheduler_jobs():
        return set(sb.run(["squeue", "-h", "-t", "all", "-n", f"dask-scheduler-{cluster_name}",
                           "-o", "%i"]).stdout.split())
    before = scheduler_jobs()
    p = ds("up", cluster_name, "--worker-mem", "64G", check=False)
    assert p.returncode != 0
    assert "dask-spank: --mem=64G exceeds worker_mem_max=32G" in p.stderr
    assert "would fail" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert scheduler_jobs() == before, "a refused up submitted its scheduler job"


def _seconds(t: str) -> int:
    """[d-]h:m:s or m:s as seconds."""
    days, _, rest = t.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def test_dry_run_and_policy_match_what_a_submission_gets(cluster_name):
    """`up --dry-run` shows the sbatch lines and the job options once the
    site's defaults are in, submits nothing, and says what a real `up`
    then gets (scontrol show job); `policy` shows the plugin's policy."""
    import json

    args = ["up", cluster_name, "--workers", "2", "--worker-mem", "2G", "--worker-cpus", "2",
            "--worker-time", "1:00:00"]
    dry = json.loads(sb.as_user(["dask-spank", *args, "--dry-run", "--json"]).stdout)
    assert not sb.run(["squeue", "-h", "-u", sb.TEST_USER]).stdout.strip(), "a dry run submits nothing"
    human = sb.as_user(["dask-spank", *args, "--dry-run"]).stdout
    assert "nothing was submitted" in human and "worker jobs: sbatch" in human, human
    out = sb.as_user(["dask-spank", *args]).stdout
    sched, arr = re.search(r"scheduler job (\d+), worker array (\d+)", out).groups()
    for role, job in (("scheduler", sched), ("workers", f"{arr}_1")):
        v, f = dry[role]["values"], sb.scontrol_job(job)
        assert f["JobName"] == v["job-name"], (f, v)
        assert f["Partition"] == v["partition"], (f, v)
        assert f["Account"] == v["account"], (f, v)
        assert f["MinMemoryNode"] == v["mem"], (f, v)
        assert _seconds(f["TimeLimit"]) == _seconds(v["time"]), (f, v)
        assert f.get("Licenses", "(null)") == v.get("licenses", "(null)"), (f, v)
        if "cpus-per-task" in v:
            assert f["CPUs/Task"] == v["cpus-per-task"], (f, v)
    assert dry["workers"]["values"]["mem"] == "2G" and dry["workers"]["values"]["cpus-per-task"] == "2"
    pol = json.loads(sb.as_user(["dask-spank", "policy", "--json"]).stdout)
    assert pol["worker_mem_max"] == "32G" and pol["worker_partition"] == "htc", pol
    text = sb.as_user(["dask-spank", "policy"]).stdout
    assert "worker jobs:" in text and "worker_mem_max" in text, text
    script = sb.as_user([str(sb.VENV / "bin" / "python"), "-c",
                         "import sys, dask_spank as d; print(d.policy()['worker_mem']); "
                         "print(d.SpankCluster(sys.argv[1]).job_script())", cluster_name]).stdout
    assert "3G" in script and "--dask-role=worker" in script and "--partition=htc" in script, script
    sb.as_user(["dask-spank", "down", cluster_name])


LOADER = """
import json, sys
from distributed import Client
# No Security object: the loader named in dask's configuration finds the
# credentials of the cluster at this address (distributed calls it only
# for an address, not for scheduler_file=).
address = json.load(open(sys.argv[1]))["address"]
with Client(address, timeout=30) as c:
    print("sum", c.submit(sum, [1, 2]).result(), "python", sorted(set(c.run(lambda: sys.executable).values())))
"""


def test_up_sizes_adapt_later_the_status_tunnel_and_the_security_loader(cluster_name):
    """The documented remainder: `up --env --worker-cpus --scheduler-mem`
    (each reaches the jobs), `dask-spank adapt` on a running cluster (no
    work: down to its minimum), the dashboard and SSH tunnel lines of
    `status`, and `distributed.client.security-loader`."""
    name = cluster_name
    venv = str(sb.VENV)
    ds("up", name, "--workers", "2", "--env", venv, "--worker-cpus", "2", "--scheduler-mem", "2G",
       "--wait", "100", "--timeout", "180")
    st = json.loads(ds("status", name, "--json").stdout)
    assert sb.scontrol_job(st["scheduler"]["job"])["MinMemoryNode"] == "2G"
    assert {sb.scontrol_job(w["job"])["CPUs/Task"] for w in st["workers"]} == {"2"}
    r = sb.as_user([f"{venv}/bin/python", "-c", LOADER, str(sb.scheduler_file(name))], check=False, timeout=120,
                   env={"DASK_DISTRIBUTED__CLIENT__SECURITY_LOADER": "dask_spank.security_loader"})
    assert r.returncode == 0 and "sum 3" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert f"python ['{venv}/bin/python']" in r.stdout, r.stdout
    # The keeper's line counts what the line above counts (within its helper's tick).
    human = sb.wait_until("the keeper's line to count the 2 workers", lambda: (lambda out: out if
                          "keeper: target 2 (fixed), 2 connected" in out else None)(ds("status", name).stdout), 20, 1)
    assert re.search(r"^scheduler tls://127\.0\.0\.1:\d+, dashboard http://127\.0\.0\.1:\d+/status\?token=[0-9a-f]{48}$",
                     human, re.M), human
    assert re.search(r"^  from your laptop: ssh -N -L \d+:127\.0\.0\.1:\d+ \S+, then open "
                     r"http://localhost:\d+/status\?token=[0-9a-f]{48}$", human, re.M), human
    # Adaptive from now on: no work, so down to its minimum.
    ds("adapt", name, "0", "3")
    # The keeper's line says so from its next step (every 5 s).
    sb.wait_until("status to say adaptive 0..3", lambda: "adaptive 0..3" in ds("status", name).stdout, 30, 1)
    sb.wait_until("no worker job left (adaptive, no work)", lambda: not [
        w for w in json.loads(ds("status", name, "--json").stdout)["workers"]
        if w["state"] in ("connected", "pending", "running")], 180, 2)
    assert connected(name) == 0
    ds("down", name)
