"""Running it as a site does (issue 18): the health check drains a node
whose agent is down and resumes it when the agent is back; a job stopped by
the agent ends FAILED with the reason, never COMPLETED; check-config says
what the plugstack line resolves to and what is wrong with it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import sandboxlib as sb

AGENT = str(sb.BIN / "dask-node-agent")
AGENT_DIR = str(sb.STATE / "run" / "agent")


def node_state(node: str = "n1") -> tuple[str, str]:
    out = sb.run(["sinfo", "-h", "-n", node, "-o", "%t|%E"]).stdout.strip()
    state, _, reason = out.partition("|")
    return state, reason


def stop_agent() -> None:
    pid = sb.agent_pid()
    os.kill(pid, signal.SIGTERM)
    sb.wait_until("the agent to exit", lambda: not os.path.exists(f"/proc/{pid}"), 30)


def test_a_node_whose_agent_is_down_is_drained_and_resumed():
    stop_agent()
    try:
        state, reason = sb.wait_until("the health check to drain n1", lambda: (
            (s := node_state()) and s[0].startswith("drain") and s), 30, 0.5)
        assert reason.startswith("dask-spank: the node agent does not answer"), reason
        # Nothing is sent to a drained node.
        job = sb.sbatch("--dask-role=scheduler", "--dask-cluster=siteops-drained")
        # Long enough for slurmctld to have placed it on a node that takes jobs.
        time.sleep(5)
        assert sb.job_states(job) == {job: "PENDING"}
        reason = sb.run(["squeue", "-h", "-j", job, "-o", "%r"]).stdout.strip()
        assert reason not in ("", "None"), reason
        sb.run(["scancel", job])
    finally:
        sb.sandbox("up")  # starts the agent
    sb.wait_until("the health check to resume n1", lambda: not node_state()[0].startswith("drain"), 30, 0.5)
    # An admin's drain is the admin's: the check leaves it alone.
    sb.run(["scontrol", "update", "nodename=n1", "state=drain", "reason=maintenance"])
    try:
        subprocess.run(["sleep", "12"])  # two health check intervals
        assert node_state() == ("drain", "maintenance")
    finally:
        sb.run(["scontrol", "update", "nodename=n1", "state=resume"])


def check_config(*args: str) -> subprocess.CompletedProcess:
    return sb.run([AGENT, "check-config", "--plugstack", str(sb.STATE / "etc" / "plugstack.conf"),
                   "--node", "n1", *args], check=False)


def test_check_config_prints_every_key_and_names_problems(policy):
    p = check_config("--agent-dir", AGENT_DIR)
    assert p.returncode == 0, p.stdout
    assert "ok    the node agent of n1 answers" in p.stdout
    assert "  tls                      required  (default)" in p.stdout
    for key in ("worker_mem", "agent_dir", "worker_start"):
        assert f"  {key} " in p.stdout
    # A bad key: a plain sbatch says nothing of dask-spank, a dask sbatch one
    # line, and check-config names the key.
    policy("bogus_key=1")
    plain = sb.as_user(["sbatch", "--wrap", "true", "-o", "/dev/null"], check=False)
    assert plain.returncode == 0 and "dask-spank" not in plain.stderr, plain.stderr
    dask = sb.as_user(["sbatch", "--dask-role=worker", "--dask-cluster=siteops-bad"], check=False)
    assert dask.returncode != 0
    assert len([l for l in dask.stderr.splitlines() if "dask-spank" in l]) == 1, dask.stderr
    p = check_config()
    assert p.returncode == 1 and "unknown key 'bogus_key'" in p.stdout, p.stdout


def test_check_config_reports_a_wrong_agent_dir(policy):
    policy("agent_dir=/run/nowhere")
    p = check_config()
    assert p.returncode == 1
    assert "ERROR agent_dir=/run/nowhere: no node agent of n1 answers on /run/nowhere/agent-n1.sock" in p.stdout, p.stdout


def test_check_config_on_a_login_node_with_the_agents_dir_and_with_slurm_down(policy, tmp_path):
    """--login-node asks no agent (a login node has none) and passes for a
    good line; --agent-dir other than the line's is an error naming both;
    a controller that does not answer is said as such, on one line, and is
    not taken for a missing partition."""
    policy("worker_partition=htc")
    stop_agent()
    try:
        p = check_config("--login-node")
        assert p.returncode == 0 and "a login node: no node agent asked" in p.stdout, p.stdout
        assert "ok    worker_partition=htc exists" in p.stdout, p.stdout
    finally:
        sb.sandbox("up")  # starts the agent
    sb.wait_until("the health check to resume n1", lambda: not node_state()[0].startswith("drain"), 30, 0.5)
    p = check_config("--agent-dir", "/run/elsewhere")
    assert p.returncode == 1, p.stdout
    assert f"ERROR agent_dir={AGENT_DIR}: the agent runs with --agent-dir /run/elsewhere" in p.stdout, p.stdout
    # slurm.conf with the controller on a port nobody listens on.
    conf = tmp_path / "slurm.conf"
    text = (sb.STATE / "etc" / "slurm.conf").read_text()
    conf.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=9", text))
    p = subprocess.run([AGENT, "check-config", "--plugstack", str(sb.STATE / "etc" / "plugstack.conf"), "--node",
                        "n1", "--agent-dir", AGENT_DIR], env={**sb.ENV, "SLURM_CONF": str(conf)}, timeout=120,
                       capture_output=True, text=True)
    assert p.returncode == 1, p.stdout
    errors = [l for l in p.stdout.splitlines() if l.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith("ERROR Slurm does not answer (scontrol ping: "), p.stdout
    assert "no such partition" not in p.stdout, p.stdout
