"""The control plane at scale, small enough for CI: one node agent in its
benchmark mode supervises many stub worker jobs (the code of figure 5 of
scripts/bench, with 200 jobs instead of 3000). And the benchmark mode's
shortcut stays out of the production agent: there, a registration for a job
slurmctld does not know is refused when its process attaches."""
import json
import os

import agentproto
import bench_control
import sandboxlib as sb


def test_agent_supervises_200_stub_jobs_and_leaves_nothing_behind():
    out = bench_control.control_plane(n=200, idle_s=3)
    assert out["stubs_alive"] == 200
    # Started as the job's user, never as root.
    assert out["stubs_as_user"] == 200
    assert out["status_jobs"] == 200 and out["status_running"] == 200
    # teardown_s is only set once every stub process is gone.
    assert out["teardown_s"] < 120
    # A few descriptors per job while they run, and none left once they
    # ended: as many as the agent had before any job.
    assert out["agent_fds"] >= 3 * 200
    assert out["agent_fds_after"] == out["agent_fds_empty"], out
    # What a job costs the agent's memory (figure 5's RSS at 3000 jobs, here
    # at 200, where the agent's fixed part weighs more): 18.5 to 19.6 KiB
    # over the empty agent in 7 runs of this code; 24.7 to 28.8 KiB at
    # c772e89, when each job's two tasks held 7 KiB of futures sized for
    # their largest await (docs/performance.md, "The agent's memory per
    # job"). Fails if that comes back.
    per_job_kib = (out["agent_rss_mib"] - out["agent_rss_empty_mib"]) * 1024 / 200
    assert per_job_kib < 22, f"{per_job_kib:.1f} KiB of the agent's memory per job: {out}"


def test_production_agent_refuses_a_job_slurmctld_does_not_know():
    u = sb.user()
    spec = bench_control.spec(0, u, os.getpid())
    spec["job_id"] = 999_999
    spec["node"] = "n1"
    spec["cluster"] = "ghost"
    sock = str(sb.STATE / "run" / "agent" / "agent-n1.sock")
    assert bench_control.Agent(sock).call(spec)["type"] == "ok"
    p = sb.as_user(agentproto.as_command("attach", sock, "999999", "/tmp"), timeout=60)
    finished = json.loads(p.stdout.splitlines()[-1])
    assert finished["type"] == "finished" and finished["exit_code"] == 1, finished
    assert "slurmctld does not know job" in finished["reason"], finished
    bench_control.Agent(sock).call({"type": "job_end", "job_id": 999_999, "reason": "test over"})
    assert not [p for p in sb.dask_processes(u.pw_uid) if "ghost" in " ".join(p["args"])]
