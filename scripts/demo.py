"""The main job, end to end, on the sandbox (run through scripts/demo).

As the unprivileged test user: submit a dask scheduler and 4 worker jobs
with nothing but `sbatch --dask-role=...`, compute with dask through the
scheduler file, connect from the user's Python with `dask_spank.connect`
(TLS, the cluster's own credentials), SIGKILL a worker and watch the agent bring it back, then
scancel and check that no dask process is left. Exits non-zero on any
failure.
"""
from __future__ import annotations

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandboxlib as sb  # noqa: E402

CLUSTER = "demo"
N = 4


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    import dask.array as da

    timings: dict[str, float] = {}
    uid = sb.user().pw_uid

    step(f"submit as {sb.TEST_USER}: a scheduler job and a {N}-task worker array")
    sb.forget_cluster(CLUSTER)
    t0 = time.monotonic()
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={CLUSTER}")
    workers = sb.sbatch("--dask-role=worker", f"--dask-cluster={CLUSTER}", f"--array=1-{N}")
    print(f"scheduler job {sched}, worker array {workers}")
    print(f"  sbatch --dask-role=scheduler --dask-cluster={CLUSTER}")
    print(f"  sbatch --dask-role=worker --dask-cluster={CLUSTER} --array=1-{N}")

    step(f"wait for {N} workers to connect")
    sb.wait_scheduler_file(CLUSTER, timeout=120)
    c = sb.client(CLUSTER)
    c.wait_for_workers(N, timeout=180)
    timings["submit_to_all_connected_s"] = time.monotonic() - t0
    print(f"{N} workers connected: {sorted(sb.worker_names(c))}")
    print(f"scheduler file: {sb.scheduler_file(CLUSTER)}")

    step("compute: sum of squares of 0..n-1 with dask.array")
    n = 2_000_000  # the sum stays below 2**63
    t1 = time.monotonic()
    x = da.arange(n, chunks=n // 40, dtype="int64")
    got = int((x * x).sum().compute())
    timings["compute_s"] = time.monotonic() - t1
    want = (n - 1) * n * (2 * n - 1) // 6
    print(f"result   {got}\nexpected {want}")
    if got != want:
        print("FAIL: wrong result")
        return 1
    print("OK: result verified")

    step(f"the user's notebook: dask_spank.connect('{CLUSTER}') (TLS with the cluster's own credentials)")
    nb = ("import dask_spank, sys\n"
          f"client = dask_spank.connect({CLUSTER!r})\n"
          "print('address', client.scheduler.address)\n"
          "print('sum', client.submit(sum, range(1000)).result())\n"
          "client.close()\n")
    p = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", nb], check=False, timeout=120)
    print(p.stdout.strip())
    if p.returncode != 0 or "sum 499500" not in p.stdout or "address tls://" not in p.stdout:
        print(f"FAIL: the notebook could not compute:\n{p.stderr[-2000:]}")
        return 1
    print("OK: computed from the user's Python over TLS")

    step("SIGKILL one worker process; the node agent restarts it")
    pids = c.run(os.getpid)  # worker address -> pid
    info = c.scheduler_info()["workers"]
    addr, pid = sorted(pids.items())[0]
    name = info[addr]["name"]
    procs = {p["pid"]: p for p in sb.dask_processes(uid)}
    if pid not in procs or procs[pid]["uid"][0] != uid:
        print(f"FAIL: worker pid {pid} is not a dask process of uid {uid}")
        return 1
    t2 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    print(f"killed worker {name} (pid {pid}, {addr})")

    def back():
        ws = c.scheduler_info()["workers"]
        return any(w["name"] == name and a != addr for a, w in ws.items()) and len(ws) == N

    sb.wait_until(f"worker {name} to re-register", back, timeout=60, interval=0.05)
    timings["restart_to_reconnected_s"] = time.monotonic() - t2
    new = [p for p in sb.dask_processes(uid) if p.get("name") == name]
    print(f"worker {name} is back as pid {new[0]['pid'] if new else '?'} "
          f"after {timings['restart_to_reconnected_s']:.2f}s; {N} workers connected")
    got = int((x * x).sum().compute())
    if got != want:
        print("FAIL: wrong result after the restart")
        return 1
    print("OK: computed again after the restart")
    c.close()

    step("scancel the cluster; no dask process may remain")
    t3 = time.monotonic()
    sb.run(["scancel", sched, workers])
    sb.wait_until("jobs to leave the queue", lambda: not sb.job_states(sched) and not sb.job_states(workers), 60)
    sb.wait_until("dask processes to exit", lambda: not sb.dask_processes(), 30)
    timings["scancel_to_no_process_s"] = time.monotonic() - t3
    print("OK: no job, no dask process left")

    step("logs")
    logs = sorted((sb.WORK / "log").glob(f"dask-*-{sched}.log")) + sorted((sb.WORK / "log").glob(f"dask-*-{workers}_*.log"))
    for p in logs:
        print(f"  {p}")
    if len(logs) != N + 1:
        print(f"FAIL: expected {N + 1} log files, found {len(logs)}")
        return 1

    step("timings")
    for k, v in timings.items():
        print(f"  {k:28s} {v:6.2f}")
    print(f"\nDEMO OK: sum of squares = {got} (verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
