"""Site policy from plugstack.conf: table-driven over every key.

For each key, three outcomes on the real sandbox:
  * the default is applied (scontrol show job shows it);
  * a value over the maximum (or a forbidden one) is rejected by sbatch with
    the exact one-line message;
  * the bypass, a submission through a client-side plugstack.conf that lacks
    the plugin (so nothing is checked at submit), is refused on the node by
    the agent before any dask process starts, with the reason in the job log.
"""
from __future__ import annotations

import os
import time

import pytest

import sandboxlib as sb

USER = sb.TEST_USER
GROUP = USER  # the test user's primary group: the default account

# A submission that passes every rule, per role; each row breaks one rule.
CONFORMING = {
    "worker": ["-p", "htc", "-A", GROUP, "-L", "sps", "-n", "1", "-c", "1", "--mem=3G", "-t", "1:00:00"],
    "scheduler": ["-p", "htc_daemon", "-A", GROUP, "-n", "1", "-c", "1", "--mem=1G", "-t", "1:00:00"],
}

# key, role, scontrol field, its default, violating args, sbatch message, node reason
ROWS = [
    ("worker_partition", "worker", "Partition", "htc", ["-p", "htc_daemon"],
     "--partition=htc_daemon is not allowed for dask workers: worker_partition=htc",
     "partition htc_daemon is not allowed for dask workers: worker_partition=htc"),
    ("scheduler_partition", "scheduler", "Partition", "htc_daemon", ["-p", "htc"],
     "--partition=htc is not allowed for dask schedulers: scheduler_partition=htc_daemon",
     "partition htc is not allowed for dask schedulers: scheduler_partition=htc_daemon"),
    ("worker_licenses", "worker", "Licenses", "sps", ["-L", "other"],
     "--licenses=other must include sps for dask workers: worker_licenses=sps",
     "licence sps is missing: worker_licenses=sps"),
    ("account", "worker", "Account", GROUP, ["-A", "other"],
     f"--account=other is not allowed for dask jobs: they are charged to account {GROUP} (account=primary-group)",
     f"account other is not allowed: dask jobs of this user are charged to account {GROUP}"),
    ("worker_cpus/worker_cpus_max", "worker", "NumCPUs", "1", ["-c", "33"],
     "--cpus-per-task=33 exceeds worker_cpus_max=32",
     "33 cpus exceed worker_cpus_max=32"),
    ("scheduler cpus (fixed 1)", "scheduler", "NumCPUs", "1", ["-c", "2"],
     "--cpus-per-task=2 is not allowed: the dask scheduler runs on 1 cpu",
     "2 cpus: the dask scheduler runs on 1 cpu"),
    ("ntasks (fixed 1)", "worker", "NumTasks", "1", ["-n", "2"],
     "--ntasks=2 is not allowed: a dask-spank job runs 1 task",
     "2 tasks: a dask-spank job runs 1 task"),
    ("worker_mem/worker_mem_max", "worker", "MinMemoryNode", "3G", ["--mem=33G"],
     "--mem=33G exceeds worker_mem_max=32G",
     "memory 33G exceeds worker_mem_max=32G"),
    ("scheduler_mem/scheduler_mem_max", "scheduler", "MinMemoryNode", "1G", ["--mem=33G"],
     "--mem=33G exceeds scheduler_mem_max=32G",
     "memory 33G exceeds scheduler_mem_max=32G"),
    ("worker_time/worker_time_max", "worker", "TimeLimit", "02:00:00", ["-t", "8:01:00"],
     "--time=8:01:00 exceeds worker_time_max=8:00:00",
     "time limit 8:01:00 exceeds worker_time_max=8:00:00"),
    ("scheduler_time/scheduler_time_max", "scheduler", "TimeLimit", "08:00:00", ["-t", "8:30:00"],
     "--time=8:30:00 exceeds scheduler_time_max=8:00:00",
     "time limit 8:30:00 exceeds scheduler_time_max=8:00:00"),
]
IDS = [r[0] for r in ROWS]
# Rows whose default is also what Slurm gives any job here (htc is the
# default partition; one cpu, one task): a plugin that inserted nothing
# would pass them, so their insertion is tested with other values below
# (the fixed scheduler cpu and task count have no other value: their rules
# are tested at sbatch and on the node).
SAME_AS_SLURM = {"worker_partition", "worker_cpus/worker_cpus_max", "scheduler cpus (fixed 1)",
                 "ntasks (fixed 1)"}
DEFAULT_ROWS = [r for r in ROWS if r[0] not in SAME_AS_SLURM]


@pytest.fixture(scope="module", autouse=True)
def default_policy():
    sb.set_policy("")
    yield


@pytest.mark.parametrize("key,role,field,default,bad,submit_msg,node_msg", DEFAULT_ROWS,
                         ids=[r[0] for r in DEFAULT_ROWS])
def test_default_is_applied(key, role, field, default, bad, submit_msg, node_msg):
    job = sb.sbatch(f"--dask-role={role}", "--dask-cluster=pol-default", "--hold")
    try:
        assert sb.scontrol_job(job)[field] == default
    finally:
        sb.run(["scancel", job])


def test_values_unlike_slurms_defaults_are_inserted(policy):
    """Policy values that differ from what Slurm would give anyway: the
    partitions swapped, 3 cpus, a named account, other memory and times."""
    plain = sb.sbatch("--hold", "--wrap=true", "-o", "/dev/null")
    policy("worker_partition=htc_daemon scheduler_partition=htc account=physics worker_cpus=3 "
           "worker_mem=700M scheduler_mem=600M worker_time=1:10:00 scheduler_time=2:20:00")
    want = {
        "worker": {"Partition": "htc_daemon", "Account": "physics", "NumCPUs": "3",
                   "MinMemoryNode": "700M", "TimeLimit": "01:10:00"},
        "scheduler": {"Partition": "htc", "Account": "physics", "NumCPUs": "1",
                      "MinMemoryNode": "600M", "TimeLimit": "02:20:00"},
    }
    slurm = sb.scontrol_job(plain)
    assert (slurm["Partition"], slurm["NumCPUs"]) == ("htc", "1") and slurm["Account"] != "physics", slurm
    jobs = [plain]
    try:
        for role, fields in want.items():
            jobs.append(sb.sbatch(f"--dask-role={role}", "--dask-cluster=pol-other", "--hold"))
            got = sb.scontrol_job(jobs[-1])
            assert {k: got[k] for k in fields} == fields, role
    finally:
        sb.run(["scancel", *jobs])


@pytest.mark.parametrize("key,role,field,default,bad,submit_msg,node_msg", ROWS, ids=IDS)
def test_over_the_limit_is_rejected_at_sbatch(key, role, field, default, bad, submit_msg, node_msg):
    before = set(sb.squeue_ids())
    for where in ("command line", "script"):
        if where == "command line":
            p = sb.as_user(["sbatch", f"--dask-role={role}", "--dask-cluster=pol-over", *bad], check=False)
        else:
            script = sb.WORK / f"over-{role}.sh"
            script.write_text("#!/bin/sh\n" + f"#SBATCH --dask-role={role} --dask-cluster=pol-over\n"
                              + f"#SBATCH {' '.join(bad)}\n" + "exec dask-spank attach\n")
            p = sb.as_user(["sbatch", str(script)], check=False)
        assert p.returncode != 0, where
        assert f"dask-spank: {submit_msg}" in p.stderr, (where, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert set(sb.squeue_ids()) == before


def bypass_conf() -> dict:
    """A client-side slurm.conf whose plugstack.conf lacks the plugin."""
    d = sb.WORK / "bypass"
    d.mkdir(exist_ok=True)
    (d / "plugstack.conf").write_text("# no dask-spank here\n")
    conf = (sb.STATE / "etc" / "slurm.conf").read_text().splitlines()
    conf = [l for l in conf if not l.startswith("PlugStackConfig=")]
    conf.append(f"PlugStackConfig={d / 'plugstack.conf'}")
    (d / "slurm.conf").write_text("\n".join(conf) + "\n")
    os.system(f"chown -R {USER}: {d}")
    return {"SLURM_CONF": str(d / "slurm.conf")}


def submit_bypass(role: str, cluster: str, args: list[str], pool: str | None = None,
                  job_name: str | None = None) -> str:
    """The remote side learns the options from the job environment (this is
    how Slurm forwards SPANK options), so a user can set them by hand: the
    role, the cluster and, for a worker pool, `--dask-pool`."""
    env = bypass_conf()
    env["_SLURM_SPANK_OPTION_dask_spank_dask_role"] = role
    env["_SLURM_SPANK_OPTION_dask_spank_dask_cluster"] = cluster
    if pool:
        env["_SLURM_SPANK_OPTION_dask_spank_dask_pool"] = pool
    name = job_name or f"dask-{role}-{cluster}" + (f"@{pool}" if pool else "")
    script = sb.WORK / "bypass" / "job.sh"
    script.write_text("#!/bin/sh\nexec dask-spank attach\n")
    os.chmod(script, 0o755)
    return sb.sbatch(*args, f"--job-name={name}", "-o", "log/bypass-%j.log", str(script), env=env)


def test_the_bypass_itself_reaches_the_node():
    """Control: without violations the bypass submission runs dask, so the
    refusals below are the policy's doing."""
    cluster = "pol-bypass-ok"
    sb.forget_cluster(cluster)
    job = submit_bypass("scheduler", cluster, CONFORMING["scheduler"])
    sb.wait_scheduler_file(cluster, timeout=60)
    sb.run(["scancel", job])
    sb.wait_job_gone(job)
    assert "scheduler started" in (sb.WORK / "log" / f"bypass-{job}.log").read_text()


@pytest.mark.parametrize("key,role,field,default,bad,submit_msg,node_msg", ROWS, ids=IDS)
def test_bypass_is_refused_on_the_node(key, role, field, default, bad, submit_msg, node_msg):
    cluster = "pol-bypass"
    job = submit_bypass(role, cluster, CONFORMING[role] + bad)
    sb.wait_job_gone(job, 60)
    log = (sb.WORK / "log" / f"bypass-{job}.log").read_text()
    assert f"refused by the site policy before any dask process started: {node_msg}" in log, log
    assert "started, pid" not in log
    assert not sb.cluster_processes(cluster)


def test_max_worker_jobs_idle_timeout_and_log_dir(policy):
    policy("max_worker_jobs=2 idle_timeout=15s log_dir=dask-logs")
    cluster = "pol-max"
    sb.forget_cluster(cluster)
    # At submit: an array larger than the limit.
    p = sb.as_user(["sbatch", "--dask-role=worker", f"--dask-cluster={cluster}", "--array=1-3"], check=False)
    assert p.returncode != 0
    assert "dask-spank: --array=1-3 asks for 3 worker jobs, more than max_worker_jobs=2" in p.stderr
    # Default applied: log_dir.
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster}")
    assert sb.scontrol_job(sched)["StdOut"] == str(sb.WORK / "dask-logs" / f"dask-scheduler-{sched}.log")
    sb.wait_scheduler_file(cluster)
    w1 = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster}", "--array=1-2")
    c = sb.client(cluster)
    c.wait_for_workers(2, timeout=60)
    c.close()
    # idle_timeout: no client and no task for 15 s ends the scheduler, and the workers follow.
    t0 = time.monotonic()
    sb.wait_job_gone(sched, 90)
    sb.wait_job_gone(w1, 90)
    elapsed = time.monotonic() - t0
    assert 10 < elapsed < 75, elapsed
    slog = (sb.WORK / "dask-logs" / f"dask-scheduler-{sched}.log").read_text()
    assert "Scheduler closing after being idle for 15" in slog, slog
    assert not sb.cluster_processes(cluster)


def test_bad_configuration_is_loud_and_fails_only_dask_jobs(policy):
    slurmd_log = sb.LOGS / "slurmd-n1.log"
    offset = slurmd_log.stat().st_size
    policy("worker_mem=3G bogus_key=1")
    p = sb.as_user(["sbatch", "--dask-role=worker", "--dask-cluster=pol-bad"], check=False)
    assert p.returncode != 0
    assert "dask-spank: plugstack.conf: unknown key 'bogus_key'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    # Ordinary jobs still run, and their users hear nothing about it.
    p = sb.as_user(["sbatch", "--parsable", "--wrap=true", "-o", "/dev/null"])
    assert "dask-spank" not in p.stderr, p.stderr
    job = p.stdout.strip()
    sb.wait_job_gone(job, 60)
    assert sb.job_state(job) == "COMPLETED"
    with slurmd_log.open("rb") as f:
        f.seek(offset)
        assert b"dask-spank: plugstack.conf: unknown key 'bogus_key'" in f.read()
    # A job that reaches the node anyway (bypass) fails there with the reason.
    job = submit_bypass("worker", "pol-bad", CONFORMING["worker"])
    sb.wait_job_gone(job, 60)
    log = (sb.WORK / "log" / f"bypass-{job}.log").read_text()
    assert "plugstack.conf: unknown key 'bogus_key'" in log
    assert "started, pid" not in log
    # No node was drained or downed by it (from Slurm 25.05 on, a plugin
    # whose init fails drains the node unless it opts out: see test_releases).
    states = sb.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split("\n")
    assert all(l.split()[1] in ("idle", "mix", "alloc") for l in states if l.strip()), states


def test_scheduler_licenses(policy):
    """scheduler_licenses defaults to none; set it and check the three outcomes."""
    job = sb.sbatch("--dask-role=scheduler", "--dask-cluster=pol-lic", "--hold")
    assert sb.scontrol_job(job)["Licenses"] == "(null)"
    sb.run(["scancel", job])
    policy("scheduler_licenses=other")
    job = sb.sbatch("--dask-role=scheduler", "--dask-cluster=pol-lic", "--hold")
    assert sb.scontrol_job(job)["Licenses"] == "other"
    sb.run(["scancel", job])
    p = sb.as_user(["sbatch", "--dask-role=scheduler", "--dask-cluster=pol-lic", "-L", "sps"], check=False)
    assert p.returncode != 0
    assert "dask-spank: --licenses=sps must include other for dask schedulers: scheduler_licenses=other" in p.stderr
    job = submit_bypass("scheduler", "pol-lic", CONFORMING["scheduler"] + ["-L", "sps"])
    sb.wait_job_gone(job, 60)
    log = (sb.WORK / "log" / f"bypass-{job}.log").read_text()
    assert "refused by the site policy before any dask process started: licence other is missing: scheduler_licenses=other" in log

@pytest.fixture
def site():
    """Run one test with other site keys (sb.set_site); the sandbox's
    default site policy is back afterwards."""
    yield sb.set_site
    sb.set_site(None)


def test_site_neutral_line_gives_what_slurm_gives_any_job(site):
    """No site keys at all: dask jobs get the partition, licences and
    account Slurm gives any job, and run."""
    site("")
    cluster = "pol-neutral"
    sb.forget_cluster(cluster)
    plain = sb.sbatch("--hold", "--wrap=true", "-o", "/dev/null")
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster}")
    worker = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster}")
    try:
        want = sb.scontrol_job(plain)
        for job in (sched, worker):
            got = sb.scontrol_job(job)
            for field in ("Partition", "Account", "Licenses"):
                assert got[field] == want[field], (field, got[field], want[field])
        assert want["Partition"] == "htc" and want["Licenses"] == "(null)", want
        sb.wait_scheduler_file(cluster)
        c = sb.client(cluster)
        c.wait_for_workers(1, timeout=60)
        c.close()
    finally:
        sb.run(["scancel", plain, sched, worker])
    sb.wait_job_gone(sched)
    sb.wait_job_gone(worker)


def test_a_value_slurm_rejects_names_the_key_that_set_it(site):
    site("worker_partition=nosuch scheduler_licenses=nolicence")
    before = set(sb.squeue_ids())
    for role, key, value, opt in [("worker", "worker_partition", "nosuch", "--partition"),
                                  ("scheduler", "scheduler_licenses", "nolicence", "--licenses")]:
        p = sb.as_user(["sbatch", f"--dask-role={role}", "--dask-cluster=pol-reject"], check=False)
        assert p.returncode != 0, p.stderr
        assert f"dask-spank: {opt}={value} was set by dask-spank's {key}" in p.stderr, p.stderr
        assert len([l for l in p.stderr.splitlines() if "dask-spank:" in l]) == 1, p.stderr
    assert set(sb.squeue_ids()) == before
