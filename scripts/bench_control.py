"""Figure 5 of scripts/bench: the control plane at scale. One node agent
supervises BENCH_STUB_JOBS (3000) worker jobs whose process is a stub
(`sleep`) instead of dask, through the agent's benchmark mode
(`run --stub-command`, which also takes the job facts from the registration
instead of slurmctld: 3000 real Slurm jobs need 3000 slurmstepds, more
memory than this machine has).

Everything else is the real agent on its real socket: root registers each
job as the plugin does (one connection per job), a process of the test user
attaches to each job as `dask-spank attach` does (handshake, request, log
file descriptor passed with SCM_RIGHTS, connection held for the job's life),
the agent starts and supervises each stub as the user (with its memory
watchdog: each job has 3 GiB), answers `status` for all of them, and stops
them all when the attach connections close.

Run alone: scripts/bench --control (or through scripts/bench).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import agentproto
import sandboxlib as sb

N = int(os.environ.get("BENCH_STUB_JOBS", "3000"))
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "30"))
NODE = "stub"
FIRST_JOB = 1_000_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The default site policy (common/src/policy.rs, Policy::default()), as the
# plugin sends it in every registration.
GIB = 1024
POLICY = {
    "scheduler": {"partition": "htc_daemon", "licenses": [], "cpus": 1, "cpus_max": 1,
                  "mem_mb": GIB, "mem_max_mb": 32 * GIB, "time_s": 8 * 3600, "time_max_s": 8 * 3600},
    "worker": {"partition": "htc", "licenses": ["sps"], "cpus": 1, "cpus_max": 32,
               "mem_mb": 3 * GIB, "mem_max_mb": 32 * GIB, "time_s": 2 * 3600, "time_max_s": 8 * 3600},
    "account": {"kind": "primary-group"},
    "max_worker_jobs": 3000,
    "idle_timeout_s": 7200,
    "nanny": {"death_timeout_s": 60, "restart_max": 5, "restart_window_s": 60,
              "lifetime_margin_s": 300, "memory_kill_percent": 95, "start": "exec"},
}

def cpu_s(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    v = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, rest = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            v[k] = int(rest.split()[0]) / 1024
    return v["VmRSS"], v["VmHWM"]


class Agent:
    """The agent's socket, spoken as root (scripts/agentproto.py)."""

    def __init__(self, path: str):
        self.path = path

    def call(self, req: dict) -> dict:
        return agentproto.call(self.path, req, client="bench")


def spec(i: int, u, stepd: int, mem_mb: int | None = None) -> dict:
    return {
        "type": "register", "job_id": FIRST_JOB + i, "array_job_id": FIRST_JOB, "array_task_id": i,
        "uid": u.pw_uid, "gid": u.pw_gid, "groups": [u.pw_gid], "user": u.pw_name, "role": "worker",
        "cluster": "stub-bench", "env_prefix": None, "cpus": 1, "mem_mb": mem_mb or int(os.environ.get("BENCH_JOB_MEM_MB", 3 * GIB)),
        "time_limit_s": 7200, "submit_dir": str(sb.HOME), "node": NODE, "stepd_pid": stepd,
        "policy": POLICY,
    }


def wait_states(agent: Agent, want: str, n: int, timeout: float) -> list[dict]:
    end = time.monotonic() + timeout
    while True:
        jobs = agent.call({"type": "status"})["jobs"]
        if sum(j["state"] == want for j in jobs if j["job_id"] >= FIRST_JOB) >= n:
            return jobs
        if time.monotonic() > end:
            states: dict = {}
            for j in jobs:
                states[j["state"]] = states.get(j["state"], 0) + 1
            raise RuntimeError(f"{n} jobs not {want} after {timeout}s: {states}")
        time.sleep(0.5)


def alive(pids: list[int]) -> int:
    n = 0
    for p in pids:
        try:
            os.kill(p, 0)
            n += 1
        except ProcessLookupError:
            pass
    return n


def uid_of(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return -1


def control_plane(n: int = N, idle_s: float = IDLE_S, job_mem_mb: int | None = None) -> dict:
    """Run figure 5 with `n` jobs; return its measurements."""
    base = sb.STATE / "bench-control"
    shutil.rmtree(base, ignore_errors=True)
    agent_dir = base / "agent"
    agent_dir.mkdir(parents=True)
    u = sb.user()
    user_dir = sb.WORK / "bench-control"
    shutil.rmtree(user_dir, ignore_errors=True)
    user_dir.mkdir()
    os.chown(user_dir, u.pw_uid, u.pw_gid)
    sock = str(agent_dir / f"agent-{NODE}.sock")
    log = open(base / "agent.log", "w")
    proc = subprocess.Popen(
        [str(sb.BIN / "dask-node-agent"), "run", "--agent-dir", str(agent_dir), "--node", NODE,
         "--stub-command", "/bin/sleep infinity"],
        stdout=log, stderr=subprocess.STDOUT, env=sb.ENV)
    agent = Agent(sock)
    attacher = None
    out: dict = {"jobs": n}
    try:
        sb.wait_until("the benchmark agent's socket", lambda: os.path.exists(sock), 30)
        out["agent_rss_empty_mib"] = rss_mib(proc.pid)[0]
        out["agent_fds_empty"] = len(os.listdir(f"/proc/{proc.pid}/fd"))

        # Registrations, one connection each, as the plugin does.
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        for i in range(n):
            r = agent.call(spec(i, u, os.getpid(), job_mem_mb))
            if r["type"] != "ok":
                raise RuntimeError(f"registration {i} refused: {r}")
        dt = time.monotonic() - t0
        out["registrations_per_s"] = n / dt
        out["agent_cpu_ms_per_registration"] = (cpu_s(proc.pid) - c0) * 1000 / n
        out["agent_rss_registered_mib"] = rss_mib(proc.pid)[0]

        # Attach as the user; the agent starts one stub per job.
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        attacher = subprocess.Popen(
            ["runuser", "-u", u.pw_name, "--",
             *agentproto.as_command("attach-many", sock, str(FIRST_JOB), str(n),
                                    str(sb.HOME / ".dask-spank" / "clusters" / "stub-bench"),
                                    str(user_dir / "jobs.log"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=user_dir)
        line = attacher.stdout.readline()
        if not line:
            raise RuntimeError(f"the attaching process failed (exit {attacher.wait()})")
        jobs = wait_states(agent, "running", n, 600)
        dt = time.monotonic() - t0
        out["starts_per_s"] = n / dt
        out["agent_cpu_ms_per_start"] = (cpu_s(proc.pid) - c0) * 1000 / n
        pids = [j["pid"] for j in jobs if j["job_id"] >= FIRST_JOB and j["pid"]]
        out["stubs_alive"] = alive(pids)
        out["stubs_as_user"] = sum(uid_of(p) == u.pw_uid for p in pids)

        # Readiness aggregation: `status` for all jobs, as `dask-node-agent
        # status` and the CLI ask it.
        lat = []
        for _ in range(5):
            t = time.monotonic()
            jobs = agent.call({"type": "status"})["jobs"]
            lat.append(time.monotonic() - t)
        out["status_jobs"] = len(jobs)
        out["status_running"] = sum(j["state"] == "running" for j in jobs)
        out["status_s_median"] = sorted(lat)[len(lat) // 2]
        out["status_bytes"] = len(json.dumps({"type": "status", "jobs": jobs}))

        # Idle: nothing happens but supervision (memory watchdog included).
        time.sleep(2)
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        time.sleep(idle_s)
        out["agent_idle_cpu_percent"] = (cpu_s(proc.pid) - c0) * 100 / (time.monotonic() - t0)
        out["agent_rss_mib"], out["agent_hwm_mib"] = rss_mib(proc.pid)
        out["agent_fds"] = len(os.listdir(f"/proc/{proc.pid}/fd"))

        # The jobs end (attach connections close): every stub must be gone.
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        attacher.stdin.close()
        attacher.wait(120)
        attacher = None
        wait_states(agent, "finished", n, 600)
        sb.wait_until("every stub process gone", lambda: alive(pids) == 0, 120)
        out["teardown_s"] = time.monotonic() - t0
        out["agent_cpu_ms_per_stop"] = (cpu_s(proc.pid) - c0) * 1000 / n
        for i in range(n):
            agent.call({"type": "job_end", "job_id": FIRST_JOB + i, "reason": "benchmark over"})
        out["agent_rss_after_mib"] = rss_mib(proc.pid)[0]
        # Descriptors of finished jobs are all closed (the log writers may
        # still be draining the last lines: give them a moment).
        sb.wait_until("the agent's descriptors back to an empty agent's",
                      lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) <= out["agent_fds_empty"], 30, 0.5)
        out["agent_fds_after"] = len(os.listdir(f"/proc/{proc.pid}/fd"))
    finally:
        if attacher is not None:
            attacher.kill()
            attacher.wait()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return out


if __name__ == "__main__":
    print(json.dumps(control_plane(), indent=2))
