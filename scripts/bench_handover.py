"""Figure 6 of scripts/bench (`scripts/bench --handover`): connected
workers over time through three walltime handovers, and what each side
pays for them. Ours: `dask-spank up` with 1-minute worker jobs (they
retire at 30 s) and the scheduler job's keeper submitting successors ahead
of time. The reference as dask-jobqueue's documentation advises for
walltimes: the same jobs, `--lifetime 30s` with a `--lifetime-stagger`
(5 s: so that its workers do not all leave at once) and `adapt()` holding
the number of jobs (it submits a new job when one ends). Both sampled every
second from the moment all 4 are connected: the connected workers (asked
of the scheduler) and the CPUs of the running worker jobs (squeue, as root),
whose sum over the window beyond the target's is the extra core-hours each
side spends on its handovers (ours' successors overlap their
predecessors). A PNG of both series; per side, the minimum and mean
connected over the target, and the extra core-hours over the target's."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import sandboxlib as sb

TARGET = 4
SECONDS = 110  # three 30 s lifetimes and some


class JobSampler:
    """The CPUs of the test user's running worker jobs (ours are named
    dask-worker-NAME, the reference's dask-worker), once a second, on a
    thread, between start() and stop()."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            out = sb.run(["squeue", "-h", "-t", "R", "-u", sb.TEST_USER, "-o", "%C %j"], check=False).stdout
            self.samples.append(sum(int(c) for c, _, name in (l.partition(" ") for l in out.splitlines())
                                    if name.startswith("dask-worker")))
            self._stop.wait(max(0.0, t0 + len(self.samples) - time.monotonic()))

    def start(self) -> "JobSampler":
        self._thread.start()
        return self

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.samples


def ours() -> tuple[list[int], list[int]]:
    name = "bench-handover"
    sb.forget_cluster(name)
    sb.set_policy("worker_successor_lead=25s")  # capped at half the 30 s life: 15 s
    try:
        sb.as_user(["dask-spank", "up", name, "--workers", str(TARGET), "--worker-time", "1",
                    "--wait", "100", "--timeout", "300"], timeout=400)
        c = sb.client(name)
        samples = []
        jobs = JobSampler().start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < SECONDS:
            samples.append(len(sb.connected_workers(c)))
            time.sleep(max(0.0, t0 + len(samples) - time.monotonic()))
        cpus = jobs.stop()
        c.close()
        sb.as_user(["dask-spank", "down", name])
    finally:
        sb.set_policy("")
        sb.cancel_all_user_jobs(120)
    return samples, cpus


_REFERENCE = r"""
import json, os, sys, time
from dask_jobqueue import SLURMCluster
from distributed import Client
target, seconds = int(sys.argv[1]), int(sys.argv[2])
cluster = SLURMCluster(
    cores=1, processes=1, memory="3GB", queue="htc", walltime="00:01:00", python=sys.executable,
    log_directory=os.path.join(os.getcwd(), "jq-logs"),
    scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
    worker_extra_args=["--host", "127.0.0.1", "--lifetime", "30s", "--lifetime-stagger", "5s"])
client = Client(cluster)
cluster.adapt(minimum_jobs=target, maximum_jobs=target)
client.wait_for_workers(target, timeout=300)
print("sampling", flush=True)
samples, t0 = [], time.monotonic()
while time.monotonic() - t0 < seconds:
    # Asked of the scheduler, as on our side (sandboxlib.connected_workers:
    # Client.scheduler_info() can read a refresh's empty cache).
    samples.append(len(client.sync(client.scheduler.identity, n_workers=-1)["workers"]))
    time.sleep(max(0.0, t0 + len(samples) - time.monotonic()))
client.close()
cluster.close()
print(json.dumps(samples))
"""


def reference() -> tuple[list[int], list[int]]:
    """Its series, and the CPUs of its running worker jobs sampled over the
    same window (from its "sampling" line to its result)."""
    p = subprocess.Popen(sb.user_command([str(sb.VENV / "bin" / "python"), "-c", _REFERENCE, str(TARGET),
                                      str(SECONDS)]), stdout=subprocess.PIPE, text=True)
    jobs = None
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.strip() == "sampling":
                jobs = JobSampler().start()
            elif line.startswith("[") and jobs:
                break
    finally:
        cpus = jobs.stop() if jobs else []
        if p.wait(timeout=900) != 0:
            raise RuntimeError(f"the reference failed: {''.join(lines)[-500:]}")
        sb.cancel_all_user_jobs(120)
    return json.loads(lines[-1]), cpus


def plot(series: dict[str, list[int]], path) -> bool:
    """The PNG (matplotlib, installed into the venv on first use: the
    bench's only extra package)."""
    try:
        import matplotlib
    except ImportError:
        subprocess.run([str(sb.VENV / "bin" / "pip"), "install", "-q", "-r",
                        str(sb.REPO / "scripts" / "requirements-bench.txt")], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, ys in series.items():
        ax.step(range(len(ys)), ys, where="post", label=label)
    ax.axhline(TARGET, color="grey", linestyle=":", label=f"target ({TARGET})")
    ax.set_xlabel("seconds since all workers connected")
    ax.set_ylabel("connected workers")
    ax.set_ylim(-0.2, max(TARGET, *(max(ys, default=0) for ys in series.values())) + 1)
    ax.set_title("Worker jobs of 1 minute (retiring at 30 s): three handovers")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def extra_core_hours(cpus: list[int]) -> float:
    """Core-hours of the worker jobs over the window beyond the target's
    (one CPU each), sampled once a second."""
    return (sum(cpus) - TARGET * len(cpus)) / 3600


def handover_rows(figures: dict) -> list[tuple]:
    (o, o_cpus), (r, r_cpus) = ours(), reference()
    path = sb.REPO / "target" / "bench-handover.png"
    path.parent.mkdir(exist_ok=True)
    plot({"dask-spank (keeper: successors)": o, "dask-jobqueue (--lifetime, adapt)": r}, path)
    figures["handover"] = {"ours": o, "jobqueue": r, "ours_worker_cpus": o_cpus, "jobqueue_worker_cpus": r_cpus,
                           "png": str(path)}
    print(f"plot: {path}")
    return [
        ("handover_min_connected_over_target", min(o) / TARGET, min(r) / TARGET),
        ("handover_mean_connected_over_target", sum(o) / len(o) / TARGET, sum(r) / len(r) / TARGET),
        # Beside each, what the target itself costs over the window; no
        # ratio (either side can be at or below zero: gaps cost nothing).
        (f"handover_extra_core_hours_over_{TARGET * SECONDS / 3600:.3f}",
         extra_core_hours(o_cpus), extra_core_hours(r_cpus), {"ratio": None}),
    ]


if __name__ == "__main__":
    figs: dict = {}
    for r in handover_rows(figs):
        print(r)
    sys.exit(0)
