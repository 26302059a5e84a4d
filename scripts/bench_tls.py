"""Task throughput and round-trip latency of a cluster over TLS, with and
without dask-spank's per-I/O workaround (python/dask_spank/tls_eof.py:
OpenSSL's error queue cleared before every TLS read and write), and over
plain TCP (`scripts/bench --tls`).

Three variants of the same cluster (a scheduler job and W worker jobs of
one thread each): `tls` (the default policy), `tls_nohook` (the same, with
a dask preload in the scheduler and the workers, and the same code in the
client, that puts back the ssl module's own methods; each side checked to
really be without it), and `tcp` (the policy tls=off, which restarts
slurmd: its own block, after an unmeasured cluster). Per cluster: the
tasks per second of 10,000 no-op tasks (client.map, then gather), and the
median round trip of 200 no-op tasks submitted one after the other. (The
tcp variant's processes load the workaround too; it acts on TLS only.) Each
repetition runs both blocks in a shuffled order, the two TLS variants in a
shuffled order within theirs; each ratio is taken within its repetition
(benchlib's median and 95 % interval).

Run as `python3 bench_tls.py measure NAME VARIANT W` (as root, the
sandbox's client side) it measures one running cluster and prints JSON."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

TASKS, ROUND_TRIPS = 10_000, 200
TLS_IO = ("recv", "recv_into", "read", "send", "sendall", "write", "do_handshake", "unwrap")

# The preload of the `tls_nohook` variant (and what its client runs): the
# ssl module's own methods back, under the wrappers tls_eof.py put there.
NOHOOK = '''
import ssl
for _name in %r:
    _io = getattr(ssl.SSLSocket, _name)
    setattr(ssl.SSLSocket, _name, getattr(_io, "__wrapped__", _io))
ssl.SSLSocket._dask_spank_clears = False
''' % (TLS_IO,)


def hooked() -> bool:
    import ssl
    return bool(getattr(ssl.SSLSocket, "_dask_spank_clears", False))


def noop(i):
    return i


def measure(name: str, variant: str, workers: int) -> dict:
    """One running cluster: its throughput and round trips, as the client."""
    import sandboxlib as sb

    c = sb.client(name)
    if variant == "tls_nohook":
        exec(NOHOOK, {})
    try:
        c.wait_for_workers(workers, timeout=300)
        sides = {"client": hooked(), "scheduler": c.run_on_scheduler(hooked),
                 "workers": sorted(set(c.run(hooked).values()))}
        want = variant == "tls"
        if variant != "tcp" and sides != {"client": want, "scheduler": want, "workers": [want]}:
            raise RuntimeError(f"{variant}: the workaround is not where it should be: {sides}")
        c.gather(c.map(noop, range(500), pure=False))  # warm: connections, task code
        t0 = time.monotonic()
        c.gather(c.map(noop, range(TASKS), pure=False))
        tasks_s = time.monotonic() - t0
        trips = []
        for i in range(ROUND_TRIPS):
            t = time.monotonic()
            c.submit(noop, i, pure=False).result()
            trips.append(time.monotonic() - t)
        return {"tasks_s": tasks_s, "tasks_per_s": TASKS / tasks_s, "round_trip_ms": 1000 * statistics.median(trips), "sides": sides}
    finally:
        c.close()


def one(variant: str, workers: int, tag: str) -> dict:
    """Start a cluster of this variant, measure it (in a process of its own,
    so the client's ssl module is as the variant wants), clean up."""
    import sandboxlib as sb

    name = f"bench-{variant.replace('_', '-')}-{tag}"
    sb.forget_cluster(name)
    env = {}
    if variant == "tls_nohook":
        preload = sb.WORK / "bench_nohook_preload.py"
        preload.write_text(NOHOOK)
        os.chown(preload, sb.user().pw_uid, sb.user().pw_gid)
        env = {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": f'["{preload}"]',
               "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{preload}"]'}
    try:
        sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}", env=env)
        sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", f"--array=1-{workers}", env=env)
        sb.wait_scheduler_file(name, 300)
        p = sb.run([str(sb.VENV / "bin" / "python"), os.path.abspath(__file__), "measure", name, variant,
                    str(workers)], timeout=1200)
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        sb.cancel_all_user_jobs(120)


def tls_rows(figures: dict, reps: int, seed: int, workers: int = 4) -> list[tuple]:
    from bench_clusters import run_blocks
    from bench_ready import interval_row

    blocks = {"tls": ("", ["tls", "tls_nohook"]), "tcp": ("tls=off", ["tcp"])}
    runs: dict[str, list[dict]] = {"tls": [], "tls_nohook": [], "tcp": []}

    def measure(rep: int, v: str) -> None:
        r = one(v, workers, str(rep))
        runs[v].append(r)
        print(f"  tls: rep {rep + 1}/{reps} {v:<10} {r['tasks_per_s']:8.0f} tasks/s "
              f"{r['round_trip_ms']:6.2f} ms", flush=True)

    warm_ups = iter(range(2 * reps))
    run_blocks(blocks, reps, seed, lambda cells: one(cells[0], workers, f"warmup-{next(warm_ups)}"), measure)
    figures["tls"] = {"seed": seed, "reps": reps, "workers": workers, **runs}

    def col(v: str, key: str) -> list[float]:
        return [r[key] for r in runs[v]]

    # Throughput as the seconds the tasks take: a ratio above 1 is ours
    # slower, as in every other figure.
    return [
        interval_row(f"noop_tasks_{TASKS}_s_tls_vs_tcp", col("tls", "tasks_s"), col("tcp", "tasks_s")),
        interval_row(f"noop_tasks_{TASKS}_s_tls_hook_vs_no_hook", col("tls", "tasks_s"), col("tls_nohook", "tasks_s")),
        interval_row("round_trip_ms_tls_vs_tcp", col("tls", "round_trip_ms"), col("tcp", "round_trip_ms")),
        interval_row("round_trip_ms_tls_hook_vs_no_hook", col("tls", "round_trip_ms"),
                     col("tls_nohook", "round_trip_ms")),
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["measure"]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
