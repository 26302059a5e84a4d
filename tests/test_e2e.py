"""End to end: `sbatch --dask-role=...` starts a real dask cluster through the
SPANK plugin and the node agent, on the real Slurm sandbox."""
import os
import signal
import time

import sandboxlib as sb


def start_cluster(name: str, workers: int, *extra: str):
    sb.forget_cluster(name)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}", *extra)
    arr = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", f"--array=1-{workers}", *extra)
    sb.wait_scheduler_file(name, timeout=120)
    c = sb.client(name)
    c.wait_for_workers(workers, timeout=120)
    return sched, arr, c


def test_sbatch_help_lists_the_dask_options():
    out = sb.as_user(["sbatch", "--help"]).stdout
    assert "--dask-role=scheduler|worker" in out
    assert "--dask-cluster=name" in out
    assert "--dask-env=path" in out


def test_bad_option_values_fail_sbatch_with_one_clear_line():
    cases = [
        (["--dask-role=bogus"], "dask-spank: --dask-role=bogus: must be one of scheduler, worker"),
        (["--dask-role=worker", "--dask-cluster=a/b"],
         "dask-spank: --dask-cluster=a/b: may only contain letters, digits, '-', '_' and '.'"),
        (["--dask-role=worker", "--dask-env=relative"], "dask-spank: --dask-env=relative: must be an absolute path"),
        (["--dask-role=worker", "--dask-env=/nonexistent/env"],
         "dask-spank: --dask-env=/nonexistent/env: /nonexistent/env/bin/python not found"),
    ]
    before = set(sb.squeue_ids())
    for args, msg in cases:
        p = sb.as_user(["sbatch", *args], check=False)
        assert p.returncode != 0, args
        assert msg in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert set(sb.squeue_ids()) == before, "a rejected submission must not create a job"


def test_bad_value_in_a_script_line_is_rejected_too(tmp_path):
    script = sb.WORK / "bad-role.sh"
    script.write_text("#!/bin/sh\n#SBATCH --dask-role=nope\nexec dask-spank attach\n")
    os.chmod(script, 0o755)
    p = sb.as_user(["sbatch", str(script)], check=False)
    assert p.returncode != 0
    assert "--dask-role=nope: must be one of scheduler, worker" in p.stderr


def slurm_calls() -> int:
    f = sb.LOGS / "agent-slurm-calls.log"
    return len(f.read_text().splitlines()) if f.exists() else 0


def test_cluster_runs_as_the_user_logs_in_log_dir_and_computes(cluster_name):
    import dask.array as da

    calls = slurm_calls()
    sched, arr, c = start_cluster(cluster_name, 2)
    # One controller call per job start, no more (three jobs started).
    assert slurm_calls() - calls == 3
    u = sb.user()
    groups = sorted(os.getgrouplist(u.pw_name, u.pw_gid))
    procs = sb.cluster_processes(cluster_name)
    assert sorted(p["role"] for p in procs) == ["scheduler", "worker", "worker"]
    for p in procs:
        assert p["uid"] == [u.pw_uid] * 4, p
        assert p["gid"] == [u.pw_gid] * 4, p
        assert sorted(p["groups"]) == groups, p
        assert p["CapEff"] == "0000000000000000" and p["CapPrm"] == "0000000000000000", p
        assert p["NoNewPrivs"] == "1", p

    x = da.arange(1_000_000, chunks=50_000, dtype="int64")
    assert int(x.sum().compute()) == 999_999 * 1_000_000 // 2
    c.close()

    log = sb.WORK / "log"
    sched_log = (log / f"dask-scheduler-{sched}.log").read_text()
    assert "scheduler started, pid" in sched_log
    assert "distributed.scheduler - INFO -   Scheduler at:" in sched_log
    for t in (1, 2):
        wlog = (log / f"dask-worker-{arr}_{t}.log").read_text()
        assert "worker started, pid" in wlog
        assert "Worker name:" in wlog and f"{cluster_name}-{arr}_{t}" in wlog
        assert "Registered to:" in wlog
        st = os.stat(log / f"dask-worker-{arr}_{t}.log")
        assert st.st_uid == u.pw_uid, "the log belongs to the user"
    info = sb.scontrol_job(sched)
    assert info["JobName"] == f"dask-scheduler-{cluster_name}"
    assert info["StdOut"] == str(log / f"dask-scheduler-{sched}.log")


def test_sigkilled_worker_comes_back_and_reconnects(cluster_name):
    import dask.array as da

    sched, arr, c = start_cluster(cluster_name, 2)
    pids = c.run(os.getpid)
    workers = c.scheduler_info()["workers"]
    addr, pid = sorted(pids.items())[0]
    name = workers[addr]["name"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def back():
        ws = c.scheduler_info()["workers"]
        return len(ws) == 2 and any(w["name"] == name and a != addr for a, w in ws.items())

    sb.wait_until("the killed worker to re-register", back, timeout=30, interval=0.05)
    elapsed = time.monotonic() - t0
    new = [p for p in sb.dask_processes() if p.get("name") == name]
    assert len(new) == 1 and new[0]["pid"] != pid
    assert new[0]["uid"][0] == sb.user().pw_uid
    x = da.ones(100_000, chunks=10_000)
    assert float(x.sum().compute()) == 100_000.0
    c.close()
    task = name.rsplit("_", 1)[1]
    wlog = (sb.WORK / "log" / f"dask-worker-{arr}_{task}.log").read_text()
    assert "worker died (killed by SIGKILL); restarting in" in wlog
    assert "worker restarted, pid" in wlog
    print(f"restart to re-registered: {elapsed:.2f}s")


def test_scancel_of_the_cluster_leaves_no_dask_process(cluster_name):
    sched, arr, c = start_cluster(cluster_name, 3)
    c.close()
    mine = lambda: sb.cluster_processes(cluster_name)
    assert len(mine()) == 4

    # One worker job first: its process must go, the rest must stay.
    victim = [p for p in mine() if p.get("name", "").endswith(f"{arr}_2")]
    assert len(victim) == 1
    sb.run(["scancel", f"{arr}_2"])
    sb.wait_until("the cancelled worker's process to exit", lambda: not os.path.exists(f"/proc/{victim[0]['pid']}"), 15)
    assert len(mine()) == 3

    sb.run(["scancel", sched, arr])
    sb.wait_until("the jobs to end", lambda: not sb.job_states(sched) and not sb.job_states(arr), 60)
    sb.wait_until("every dask process of the cluster to exit", lambda: not mine(), 30)
    slog = (sb.WORK / "log" / f"dask-scheduler-{sched}.log").read_text()
    assert "scheduler stopped" in slog or "scheduler exited" in slog


def second_venv(name: str):
    """A venv of the test user's own, other than the sandbox's, whose
    Python finds distributed through a .pth file."""
    env = sb.WORK / f"venv-{name}"
    sb.as_user(["rm", "-rf", str(env)])
    sb.as_user(["/usr/bin/python3", "-m", "venv", "--without-pip", str(env)])
    site = next((env / "lib").glob("python3*/site-packages"))
    base = next((sb.VENV / "lib").glob("python3*/site-packages"))
    sb.as_user(["/usr/bin/python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                str(site / "sandbox.pth"), str(base)])
    return env


def test_own_job_script_activating_an_env_runs_dask_in_it(cluster_name):
    """A user's script: #SBATCH lines, its own environment, then attach."""
    env2 = second_venv(cluster_name)
    script = sb.WORK / f"{cluster_name}.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --dask-role=worker\n"
        f"#SBATCH --dask-cluster={cluster_name}\n"
        f"source {env2}/bin/activate\n"
        "export MY_ANALYSIS_SETTING=42\n"
        "exec dask-spank attach\n"
    )
    os.chmod(script, 0o755)
    sb.forget_cluster(cluster_name)
    sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    job = sb.sbatch(str(script))
    sb.wait_scheduler_file(cluster_name, timeout=120)
    c = sb.client(cluster_name)
    c.wait_for_workers(1, timeout=120)
    import sys
    env = c.run(lambda: (os.environ.get("MY_ANALYSIS_SETTING"), os.environ.get("VIRTUAL_ENV"),
                         os.environ.get("OMP_NUM_THREADS"), sys.prefix))
    assert list(env.values()) == [("42", str(env2), "1", str(env2))]
    c.close()
    assert (sb.WORK / "log" / f"dask-worker-{job}.log").exists()
    assert sb.scontrol_job(job)["JobName"] == f"dask-worker-{cluster_name}"


def test_srun_and_salloc_refuse_dask_role_but_srun_inside_a_dask_job_runs(cluster_name):
    """--dask-role makes a batch job; srun and salloc would run the user's
    command instead, so they fail with one clear line rather than ignore it.
    Inside a dask job's own script, srun (which sees the job's options in
    its environment) runs as usual."""
    # srun and salloc from a login shell, and srun in an ordinary allocation.
    for prefix, cmd in ((), "srun"), ((), "salloc"), (("salloc",), "srun"):
        p = sb.as_user([*prefix, cmd, "--dask-role=worker", f"--dask-cluster={cluster_name}", "true"],
                       check=False)
        assert p.returncode != 0
        assert (f"dask-spank: --dask-role works with sbatch only: {cmd} would run your command, not dask; "
                "submit with sbatch --dask-role=...") in p.stderr, p.stderr
    marker = sb.WORK / f"{cluster_name}.srun"
    script = sb.WORK / f"{cluster_name}-srun.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --dask-role=worker\n"
        f"#SBATCH --dask-cluster={cluster_name}\n"
        f"srun bash -c 'echo step $SLURM_STEP_ID > {marker}' || exit 3\n"
        "exec dask-spank attach\n"
    )
    os.chmod(script, 0o755)
    sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    job = sb.sbatch(str(script))
    sb.wait_scheduler_file(cluster_name, timeout=120)
    c = sb.client(cluster_name)
    c.wait_for_workers(1, timeout=120)
    assert marker.read_text().strip() == "step 0"
    c.close()
    assert sb.scontrol_job(job)["JobName"] == f"dask-worker-{cluster_name}"


def test_job_fails_with_a_clear_message_when_the_agent_is_down(cluster_name):
    """A job that reaches a node whose agent is down fails at once, FAILED,
    with the reason. (The node's health check, off here, would drain the
    node first: test_siteops.)"""
    sb.health_check(False)
    pidfile = sb.STATE / "run" / "agent-n1.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    sb.wait_until("the agent to exit", lambda: not os.path.exists(f"/proc/{pid}"), 20)
    try:
        job = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
        sb.wait_until("the job to end", lambda: not sb.job_states(job), 60)
        log = (sb.WORK / "log" / f"dask-worker-{job}.log").read_text()
        assert "dask-spank: no dask-spank node agent on n1" in log, log
        assert "resubmit the job" in log
        assert sb.job_state(job) == "FAILED"
        assert not sb.cluster_processes(cluster_name)
    finally:
        sb.health_check(True)
        sb.sandbox("up")  # restarts the agent


def test_unprivileged_user_cannot_register_or_end_jobs():
    u = sb.user()
    spec = {
        "job_id": 999999, "array_job_id": None, "array_task_id": None, "uid": 0, "gid": 0,
        "groups": [], "user": "root", "role": "worker", "cluster": "evil", "env_prefix": None,
        "cpus": 1, "mem_mb": 0, "time_limit_s": None, "submit_dir": "/", "node": "n1", "stepd_pid": 1,
        "policy": {
            "scheduler": {"partition": None, "licenses": [], "cpus": 1, "cpus_max": 1, "mem_mb": 1,
                          "mem_max_mb": 1 << 30, "time_s": 60, "time_max_s": 1 << 30},
            "worker": {"partition": None, "licenses": [], "cpus": 1, "cpus_max": 4096, "mem_mb": 1,
                       "mem_max_mb": 1 << 30, "time_s": 60, "time_max_s": 1 << 30},
            "account": {"kind": "none"}, "max_worker_jobs": 1000000, "idle_timeout_s": 1 << 30,
            "nanny": {"death_timeout_s": 60, "restart_max": 5, "restart_window_s": 60,
                      "lifetime_margin_s": 300, "memory_kill_percent": 95, "start": "exec"},
        },
    }
    r = sb.agent_request({"type": "register", **spec})
    assert r["type"] == "error" and f"uid {u.pw_uid}" in r["message"] and "only root" in r["message"]
    r = sb.agent_request({"type": "job_end", "job_id": 1, "reason": "x"})
    assert r["type"] == "error" and "only root" in r["message"]
    r = sb.agent_request({"type": "attach", "job_id": 999999, "cwd": "/", "env": [], "cluster_dir": "/tmp"})
    assert r["type"] == "error" and "not registered" in r["message"]
