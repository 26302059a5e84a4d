"""Figure 6 of scripts/bench (`scripts/bench --handover`): connected
workers over time through three walltime handovers. Ours: `dask-spank up`
with 1-minute worker jobs (they retire at 30 s) and the scheduler job's
keeper submitting successors ahead of time. The reference: dask-jobqueue's
SLURMCluster with the same jobs and `--lifetime 30s`, as its documentation
advises for walltimes; nothing replaces its workers when they leave. Both
sampled every second from the moment all 4 are connected; a PNG of both
series and, per side, the minimum connected over the target."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import sandboxlib as sb

TARGET = 4
SECONDS = 110  # three 30 s lifetimes and some


def ours() -> list[int]:
    name = "bench-handover"
    sb.forget_cluster(name)
    sb.set_policy("worker_successor_lead=25s")  # capped at half the 30 s life: 15 s
    try:
        sb.as_user(["dask-spank", "up", name, "--workers", str(TARGET), "--worker-time", "1",
                    "--wait", "100", "--timeout", "300"], timeout=400)
        c = sb.client(name)
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < SECONDS:
            samples.append(len(c.scheduler_info()["workers"]))
            time.sleep(max(0.0, t0 + len(samples) - time.monotonic()))
        c.close()
        sb.as_user(["dask-spank", "down", name])
    finally:
        sb.set_policy("")
        sb.cancel_all_user_jobs(120)
    return samples


_REFERENCE = r"""
import json, os, sys, time
from dask_jobqueue import SLURMCluster
from distributed import Client
target, seconds = int(sys.argv[1]), int(sys.argv[2])
cluster = SLURMCluster(
    cores=1, processes=1, memory="3GB", queue="htc", walltime="00:01:00", python=sys.executable,
    log_directory=os.path.join(os.getcwd(), "jq-logs"),
    scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
    worker_extra_args=["--host", "127.0.0.1", "--lifetime", "30s", "--lifetime-stagger", "0s"])
client = Client(cluster)
cluster.scale(jobs=target)
client.wait_for_workers(target, timeout=300)
samples, t0 = [], time.monotonic()
while time.monotonic() - t0 < seconds:
    samples.append(len(client.scheduler_info()["workers"]))
    time.sleep(max(0.0, t0 + len(samples) - time.monotonic()))
client.close()
cluster.close()
print(json.dumps(samples))
"""


def reference() -> list[int]:
    p = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", _REFERENCE, str(TARGET), str(SECONDS)], timeout=900)
    sb.cancel_all_user_jobs(120)
    return json.loads(p.stdout.strip().splitlines()[-1])


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


def handover_rows(figures: dict) -> list[tuple]:
    o, r = ours(), reference()
    path = sb.REPO / "target" / "bench-handover.png"
    path.parent.mkdir(exist_ok=True)
    plot({"dask-spank (keeper: successors)": o, "dask-jobqueue (--lifetime)": r}, path)
    figures["handover"] = {"ours": o, "jobqueue": r, "png": str(path)}
    print(f"plot: {path}")
    return [
        ("handover_min_connected_over_target", min(o) / TARGET, min(r) / TARGET),
        ("handover_mean_connected_over_target", sum(o) / len(o) / TARGET, sum(r) / len(r) / TARGET),
    ]


if __name__ == "__main__":
    figs: dict = {}
    for row in handover_rows(figs):
        print(row)
    sys.exit(0)
