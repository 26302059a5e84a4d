"""Time to the first result (scripts/bench --first-result): from the
command that starts a one-worker cluster to the result of a trivial task,
on the sandbox, as the test user, three ways side by side:

* `up`: `dask-spank up NAME --workers 1`, then a client
  (`dask_spank.connect`), the shell path;
* `spankcluster`: `Client(SpankCluster(workers=1))`, the notebook path;
* `jobqueue`: the reference, dask-jobqueue's SLURMCluster (with its
  Nanny, as its docs configure it) scaled to one job, then a client.

Each way once first, not counted (the first cluster after the sandbox
starts is cold), then BENCH_REPS (7) times each in one shuffled order, so
that drift of the machine hits the three alike. Printed per way: the
median and a distribution-free interval of the median (order statistics;
its coverage is printed: 98 % with 7 runs), then the ratios of the
medians. Writes target/bench-first[-slurm-V].json.

Run as `python3 bench_first.py run WAY NAME` (as the test user) it times
one way once and prints {"seconds": S}.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time

WAYS = ("up", "spankcluster", "jobqueue")


def one(way: str, name: str) -> float:
    """One start to first result, in seconds (as the test user)."""
    from distributed import Client

    t0 = time.monotonic()
    if way == "up":
        subprocess.run(["dask-spank", "up", name, "--workers", "1"], check=True, capture_output=True)
        from dask_spank import connect

        client = connect(name)
        assert client.submit(lambda: 1).result(timeout=600) == 1
        seconds = time.monotonic() - t0
        client.close()
        subprocess.run(["dask-spank", "down", name], check=True, capture_output=True)
        return seconds
    if way == "spankcluster":
        from dask_spank import SpankCluster

        cluster = SpankCluster(name, workers=1)
        client = Client(cluster)
        assert client.submit(lambda: 1).result(timeout=600) == 1
        seconds = time.monotonic() - t0
        client.close()
        cluster.close()
        return seconds
    from dask_jobqueue import SLURMCluster

    # As scripts/bench_jobqueue.py configures it.
    cluster = SLURMCluster(
        cores=1, processes=1, memory="3GB", queue="htc", walltime="01:00:00",
        python=sys.executable, log_directory=os.path.join(os.getcwd(), "jq-logs"),
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        worker_extra_args=["--host", "127.0.0.1"],
    )
    client = Client(cluster)
    cluster.scale(jobs=1)
    assert client.submit(lambda: 1).result(timeout=600) == 1
    seconds = time.monotonic() - t0
    client.close()
    cluster.close()
    return seconds


def main() -> int:
    import sandboxlib as sb
    from benchlib import median_interval

    reps = int(os.environ.get("BENCH_REPS", "7"))
    seed = int(os.environ.get("BENCH_SEED", str(int(time.time()))))
    sb.sandbox("up")
    order = [w for w in WAYS for _ in range(reps)]
    random.Random(seed).shuffle(order)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    failures: list[str] = []
    for i, way in enumerate(list(WAYS) + order):
        name = f"first-{way}-{i}"
        sb.forget_cluster(name)
        p = sb.as_user([str(sb.VENV / "bin" / "python"), os.path.abspath(__file__), "run", way, name],
                       check=False, timeout=1200)
        sb.cancel_all_user_jobs(120)
        if p.returncode != 0:
            tail = " | ".join(p.stderr.strip().splitlines()[-3:])
            failures.append(f"{way} run {i}: {tail}")
            print(f"{way}: failed: {tail}", file=sys.stderr, flush=True)
            continue
        seconds = json.loads(p.stdout.strip().splitlines()[-1])["seconds"]
        warm_up = i < len(WAYS)
        print(f"{way:<13} {seconds:7.2f} s{'  (warm-up, not counted)' if warm_up else ''}", flush=True)
        if not warm_up:
            times[way].append(seconds)
    rows = {}
    print(f"\ntime from the start to the first result, {reps} runs each (seed {seed})")
    for way, xs in times.items():
        if not xs:
            continue
        lo, hi, cov = median_interval(xs)
        rows[way] = {"median_s": statistics.median(xs), "low_s": lo, "high_s": hi, "coverage": cov, "runs": xs}
        print(f"{way:<13} median {rows[way]['median_s']:6.2f} s  [{lo:.2f}, {hi:.2f}] ({cov:.0%})  n={len(xs)}")
    ref = rows.get("jobqueue", {}).get("median_s")
    for way in ("up", "spankcluster"):
        if ref and way in rows:
            print(f"ratio {way}/jobqueue: {rows[way]['median_s'] / ref:.2f}")
    name = "bench-first" + ("" if sb.SLURM_RELEASE == sb.HOST_SLURM else f"-slurm-{sb.SLURM_RELEASE}")
    path = sb.REPO / "target" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"ways": rows, "failures": failures, "seed": seed, "reps": reps,
                                "slurm": sb.SLURM_RELEASE, "nproc": os.cpu_count()}, indent=2))
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        print(json.dumps({"seconds": one(sys.argv[2], sys.argv[3])}))
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        sys.exit(main())
