"""The reference side of scripts/bench: dask-jobqueue's SLURMCluster (with
its default Nanny) on the same sandbox, run as the test user. Prints one
JSON document."""
import json
import os
import statistics
import sys
import time

from benchlib import restart_latencies, rss_mib


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                    out.append(int(d))
            except OSError:
                pass
    return out


def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def main():
    sizes = [int(x) for x in sys.argv[1].split(",")]
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    res = {"ready": {}, "restart": [], "nanny_rss_mib": None}
    for n in sizes:
        t0 = time.monotonic()
        cluster = SLURMCluster(
            cores=1, processes=1, memory="3GB", queue="htc", walltime="01:00:00",
            python=sys.executable, log_directory=os.path.join(os.getcwd(), "jq-logs"),
            scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
            worker_extra_args=["--host", "127.0.0.1"],
        )
        client = Client(cluster)
        cluster.scale(jobs=n)
        client.wait_for_workers(n, timeout=900)
        res["ready"][n] = time.monotonic() - t0
        if n == sizes[0]:
            # Supervision memory: each Nanny and its resource_tracker.
            per = []
            for pid in client.run(os.getpid).values():
                nanny = int(open(f"/proc/{pid}/stat").read().split(")")[1].split()[1])
                tracker = [c for c in children(nanny) if "resource_tracker" in cmdline(c)]
                per.append(rss_mib(nanny) + sum(rss_mib(t) for t in tracker))
            res["nanny_rss_mib"] = statistics.median(per)
            # Restart latency: SIGKILL a worker under its Nanny, time to re-registration.
            res["restart"] = restart_latencies(client, n)
        client.close()
        cluster.close()
        time.sleep(2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
