"""Figures 2 to 4 of scripts/bench: what supervision costs in memory, per
worker job and per cluster, and how fast a killed worker is back; both
sides at the same N (PSS shares a page among the processes that map it, so
a larger N would lower the per-job figure of the side measured there).

Per worker job, PSS: ours, the job's `dask-spank attach` and its share of
the node agent's growth; theirs, the batch shell and, with the Nanny, the
Nanny and its resource_tracker (scripts/bench_jobqueue.py). Per cluster:
ours also runs the scheduler job's attach and its keeper helper, which the
reference has no counterpart of (its scheduler lives in the client, as
ours lives in its job: neither scheduler is counted), and holds the
scheduler job's allocation, stated in core-hours. With
worker_start=forkserver each worker job also keeps a fork server, whose
PSS is read after a minute of work (right after the start its pages are
still shared with the worker it forked), and so is the whole job's (fork
server, worker and supervision) beside a default job's and the reference's
(batch shell, worker and, with the Nanny, Nanny and tracker) after the
same work.

Two blocks (bench_clusters.run_blocks): the default configuration (ours,
the reference with and without its Nanny) and worker_start=forkserver;
each figure is the median over repetitions with a 95 % interval of the
ratios (benchlib), each repetition in a sandbox started afresh."""
from __future__ import annotations

import os
import re
import statistics

import sandboxlib as sb
from bench_clusters import attach_pids, jobqueue, run_blocks, start_cluster
from bench_ready import interval_row, warm_up
from benchlib import descendants, median, pss_mib, restart_latencies, rss_mib, uss_mib, work_for

# Seconds of work before the fork server's memory is read.
WORK_S = float(os.environ.get("BENCH_FORKSERVER_WORK_S", "60"))


def slurm_calls() -> int:
    """Calls the node agent made to Slurm's commands so far (the sandbox
    runs it with counting wrappers on its PATH)."""
    f = sb.LOGS / "agent-slurm-calls.log"
    return len(f.read_text().splitlines()) if f.exists() else 0


def scheduler_job_allocation(name: str) -> dict:
    """The scheduler job's CPUs and time limit (what Slurm charges if the
    cluster is kept to its limit; None for a job without a limit)."""
    jobs = sb.run(["squeue", "-h", "-n", f"dask-scheduler-{name}", "-o", "%i"]).stdout.split()
    fields = sb.scontrol_job(jobs[0]) if jobs else {}
    cpus = int(fields.get("NumCPUs", "0") or 0)
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)", fields.get("TimeLimit", ""))
    if not m:
        return {"cpus": cpus, "time_limit": fields.get("TimeLimit"), "core_hours": None}
    days, h, mi, se = (int(x or 0) for x in m.groups())
    hours = days * 24 + h + mi / 60 + se / 3600
    return {"cpus": cpus, "time_limit_h": hours, "core_hours": cpus * hours}


def helper_connected(client) -> bool:
    """Whether the scheduler has a client beside the bench's own (and
    distributed's "fire-and-forget"): the keeper's helper."""
    clients = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients))
    return len([k for k in clients if k != "fire-and-forget" and k != client.id]) >= 1


def ours(n: int, name: str) -> dict:
    """One cluster of n workers: memory per worker job and per cluster,
    the scheduler job's allocation, Slurm calls per job start, restarts."""
    agent = sb.agent_pid()
    pss0, calls0 = pss_mib(agent), slurm_calls()
    c, _ = start_cluster(name, n)
    out = {"controller_calls_per_job_start": (slurm_calls() - calls0) / (n + 1)}
    workers = [pss_mib(p) for p in attach_pids("worker")]
    out["attach_pss_mib"] = statistics.median(workers) if workers else 0.0
    out["agent_pss_delta_per_job_mib"] = (pss_mib(agent) - pss0) / (n + 1)
    out["per_job_pss_mib"] = out["attach_pss_mib"] + out["agent_pss_delta_per_job_mib"]
    # The keeper's helper imports distributed once it connects (some 35 MiB
    # of the cluster's memory), which may come after the last worker (likely
    # since workers no longer wait for their scheduler's report): run R
    # measured before, 8 MiB against F's 44.
    sb.wait_until("the keeper's helper to connect", lambda: helper_connected(c), 120, 0.5)
    sched = attach_pids("scheduler")
    out["per_cluster_pss_mib"] = sum(pss_mib(p) for s in sched for p in [s, *descendants(s)])
    out["per_cluster_processes"] = sum(1 + len(descendants(s)) for s in sched)
    out["scheduler_job"] = scheduler_job_allocation(name)
    out["restart_s_all"] = restart_latencies(c, n)
    out["restart_s"] = median(out["restart_s_all"])
    # The same work as the fork server's block, then the workers' memory:
    # what a worker job holds in all, set beside a fork server's job.
    out["tasks"] = work_for(c, n, WORK_S)
    out["worker_pss_mib"] = workers_pss_mib(c)
    c.close()
    sb.cancel_all_user_jobs(120)
    return out


def fork_servers() -> list[int]:
    """The fork servers (`dask-forkserver`), by their process name."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if open(f"/proc/{d}/comm").read().strip() == "dask-forkserver":
                    out.append(int(d))
            except OSError:
                pass
    return out


def workers_pss_mib(c) -> float:
    """The median PSS of the cluster's worker processes (by the pids they
    report: the sandbox's nodes share this machine's pid namespace)."""
    return median([pss_mib(p) for p in c.run(os.getpid).values()])


def ours_forkserver(n: int, name: str) -> dict:
    """Restart latency with worker_start=forkserver (the policy is already
    applied), and after WORK_S of work the fork server's memory and its
    worker's."""
    c, _ = start_cluster(name, n)
    out = {"restart_s_all": restart_latencies(c, n)}
    out["restart_s"] = median(out["restart_s_all"])
    out["tasks"] = work_for(c, n, WORK_S)
    servers = fork_servers()
    out["pss_mib"] = median([pss_mib(p) for p in servers])
    out["rss_mib"] = median([rss_mib(p) for p in servers])
    out["uss_mib"] = median([uss_mib(p) for p in servers])
    out["worker_pss_mib"] = workers_pss_mib(c)
    c.close()
    sb.cancel_all_user_jobs(120)
    return out


def memory_rows(figures: dict, n: int, reps: int, seed: int) -> list[tuple]:
    blocks = {"default": ("", ["ours", "jq", "jq_no_nanny"]), "forkserver": ("worker_start=forkserver", ["forkserver"])}
    runs: dict[str, list[dict]] = {"ours": [], "jq": [], "jq_no_nanny": [], "forkserver": []}

    def measure(rep: int, cell: str) -> None:
        print(f"  memory: rep {rep + 1}/{reps} {cell} N={n}", flush=True)
        if cell == "ours":
            runs[cell].append(ours(n, f"bench-mem-{n}-{rep}"))
        elif cell == "forkserver":
            runs[cell].append(ours_forkserver(n, f"bench-fs-{n}-{rep}"))
        else:
            runs[cell].append(jobqueue(n, cell == "jq", work=WORK_S))

    # A sandbox started afresh for each repetition: PSS hardly moves within
    # one start, but by a few per cent between two runs (2026-12-06, runs A,
    # B and C), beyond intervals taken within one start.
    run_blocks(blocks, reps, seed, lambda cells: warm_up(("ours", *cells)), measure, fresh_sandbox=True)
    figures["memory"] = {"n": n, "seed": seed, "reps": reps, **runs}

    def col(block: str, key: str) -> list[float]:
        return [r[key] for r in runs[block]]

    ours_job, fs = col("ours", "per_job_pss_mib"), col("forkserver", "pss_mib")
    jq_job, jqn_job = col("jq", "per_job_pss_mib"), col("jq_no_nanny", "per_job_pss_mib")
    jq_restart = [statistics.median(r["restart"]) for r in runs["jq"]]
    # A whole cluster of n workers beside its scheduler and workers: n
    # worker jobs' supervision, and ours' per-cluster processes.
    ours_cluster = [n * j + k for j, k in zip(ours_job, col("ours", "per_cluster_pss_mib"))]
    # A whole worker job after the same work: supervision and worker, with
    # worker_start=forkserver also the fork server (which shares its
    # imported modules with the worker it forked).
    ours_total = [j + w for j, w in zip(ours_job, col("ours", "worker_pss_mib"))]
    fs_total = [j + f + w for j, f, w in zip(ours_job, fs, col("forkserver", "worker_pss_mib"))]
    sched = runs["ours"][0]["scheduler_job"]
    # The reference's scheduler runs in the client, on no allocation.
    held = [("scheduler_job_core_hours_to_its_time_limit", sched["core_hours"], None)] if sched["core_hours"] else []
    return held + [
        interval_row(f"per_job_pss_mib_N{n}_vs_nanny", ours_job, jq_job),
        interval_row(f"per_job_pss_mib_N{n}_vs_no_nanny", ours_job, jqn_job),
        interval_row(f"cluster_pss_mib_N{n}_beside_scheduler_and_workers_vs_nanny", ours_cluster,
                     [n * j for j in jq_job]),
        interval_row("restart_to_registered_s_median", col("ours", "restart_s"), jq_restart),
        interval_row("restart_s_median_forkserver", col("forkserver", "restart_s"), jq_restart),
        interval_row(f"per_job_pss_mib_N{n}_forkserver_after_{WORK_S:.0f}s_vs_nanny",
                     [j + f for j, f in zip(ours_job, fs)], jq_job),
        # Does the fork server's memory come back as a smaller worker?
        interval_row(f"job_total_pss_mib_N{n}_after_{WORK_S:.0f}s_forkserver_vs_default", fs_total, ours_total),
        # And beside the reference's whole job after the same work (batch
        # shell and worker; with its Nanny also the Nanny and its tracker).
        interval_row(f"job_total_pss_mib_N{n}_after_{WORK_S:.0f}s_vs_nanny", ours_total, col("jq", "job_total_pss_mib")),
        interval_row(f"job_total_pss_mib_N{n}_after_{WORK_S:.0f}s_forkserver_vs_nanny", fs_total,
                     col("jq", "job_total_pss_mib")),
        interval_row(f"job_total_pss_mib_N{n}_after_{WORK_S:.0f}s_vs_no_nanny", ours_total,
                     col("jq_no_nanny", "job_total_pss_mib")),
        (f"controller_calls_per_job_start_N{n}", max(col("ours", "controller_calls_per_job_start")), 1.0),
    ]
