"""The reference side of scripts/bench: dask-jobqueue's SLURMCluster (with
its default Nanny, or with nanny=False: the floor of Slurm and a cold
Python start with no supervision) on the same sandbox, run as the test
user. Prints one JSON document."""
import json
import os
import resource
import statistics
import sys
import time

from benchlib import (children, did_not_reach, parent, pss_mib, restart_latencies, rpcs_by_type, rpcs_left_alone, rss_mib,
                      work_for)


def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def per_job_pss(client, nanny: bool, with_worker: bool = False) -> float:
    """What each worker job runs beside its worker, PSS: the batch shell,
    and with the Nanny, the Nanny and its resource_tracker (with_worker:
    and the worker too, the whole job)."""
    per = []
    for pid in client.run(os.getpid).values():
        procs = [pid] if with_worker else []
        up = parent(pid)
        if nanny:
            procs.append(up)
            procs += [c for c in children(up) if "resource_tracker" in cmdline(c)]
            up = parent(up)
        if "bash" in cmdline(up) or "sh " in cmdline(up):
            procs.append(up)
        per.append(sum(pss_mib(p) for p in procs))
    return statistics.median(per)


def main():
    """jobqueue_bench.py SIZES [--no-nanny]: time to ready per size (and at
    the first size, the memory per job and the restart latency)."""
    sizes = [int(x) for x in sys.argv[1].split(",")]
    nanny = "--no-nanny" not in sys.argv[2:]
    # Time to ready only (the cores-declared figure): a SIGKILL right after
    # a lone worker registered can catch its Nanny still starting, which
    # then gives up ("Nanny failed to start"), and the job ends.
    ready_only = "--ready-only" in sys.argv[2:]
    timeout = float(sys.argv[sys.argv.index("--timeout") + 1]) if "--timeout" in sys.argv else 900.0
    # Seconds of the memory figure's work (scripts/bench_memory.py), after
    # which the whole job is read, as ours is after the same work.
    work_s = float(sys.argv[sys.argv.index("--work") + 1]) if "--work" in sys.argv else 0.0
    # The scheduler runs in this process, which runuser leaves at a soft
    # limit of 1024 descriptors: at N=256 it ran out ("Too many open
    # files", run P). distributed's `dask scheduler` command raises its own
    # limit so (distributed/cli/dask_scheduler.py); jobqueue's in-process
    # scheduler does not, a known complaint of its users. The reference is
    # given the command's limit: its best case, not its users' default.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard // 2), hard))
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    res = {"ready": {}, "restart": [], "nanny_rss_mib": None, "per_job_pss_mib": None, "nanny": nanny}
    for n in sizes:
        t0 = time.monotonic()
        cluster = SLURMCluster(
            cores=1, processes=1, memory="3GB", queue="htc", walltime="01:00:00",
            python=sys.executable, log_directory=os.path.join(os.getcwd(), "jq-logs"),
            scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
            worker_extra_args=["--host", "127.0.0.1"], nanny=nanny,
        )
        client = Client(cluster)
        cluster.scale(jobs=n)
        try:
            client.wait_for_workers(n, timeout=timeout)
        except TimeoutError as e:
            # A result too (--scale): the side did not get there in time.
            res["did_not_reach"] = did_not_reach(client, e, n, timeout)
            client.close()
            cluster.close()
            break
        res["ready"][n] = time.monotonic() - t0
        if "--sdiag" in sys.argv[2:]:
            # slurmctld's RPCs since the caller reset sdiag (the last size's).
            res["rpcs_by_type_at_ready"] = rpcs_by_type()
            if "--idle" in sys.argv:
                # Then the cluster left alone: what it asks of slurmctld
                # while nothing happens (its workers connected, no work).
                idle_s = float(sys.argv[sys.argv.index("--idle") + 1])
                res["rpcs_by_type_idle"], res["rpcs_by_type_settled"] = rpcs_left_alone(idle_s, rpcs_by_type())
        if n == sizes[0] and not ready_only:
            res["per_job_pss_mib"] = per_job_pss(client, nanny)
            if nanny:
                # Each Nanny and its resource_tracker (RSS, as recorded before).
                per = []
                for pid in client.run(os.getpid).values():
                    up = parent(pid)
                    tracker = [c for c in children(up) if "resource_tracker" in cmdline(c)]
                    per.append(rss_mib(up) + sum(rss_mib(t) for t in tracker))
                res["nanny_rss_mib"] = statistics.median(per)
                # Restart latency: SIGKILL a worker under its Nanny, time to re-registration.
                res["restart"] = restart_latencies(client, n)
            if work_s:
                res["tasks"] = work_for(client, n, work_s)
                res["job_total_pss_mib"] = per_job_pss(client, nanny, with_worker=True)
        client.close()
        cluster.close()
        time.sleep(2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
