"""Figures at scale (`scripts/bench --scale`): time to ready at N = 128 and
256 (BENCH_SCALE_SIZES) on a 4-node sandbox, ours against the reference
with its Nanny (scripts/bench_ready.py's blocks, shuffled, BENCH_REPS), and
the RPCs slurmctld served per worker job start at the largest N, from
`sdiag` (reset before each cluster, read once all its workers are
connected), for both sides.

The sandbox's nodes are four slurmd daemons on this machine's cores, each
declaring a quarter of the largest cluster's CPUs (scripts/sandbox.py: many
one-core jobs share the real cores, and Slurm spreads them over the
nodes): the figures say how both sides behave with many jobs on several
nodes, not how fast 256 workers run on 2 cores. Memory bounds N here:
each worker is a Python process (and the reference's Nanny another), and
this machine has no swap: a cluster that would leave less than
BENCH_MEMORY_FLOOR_MIB (2 GiB) available, or whose workers are not all
connected after BENCH_SCALE_TIMEOUT, is stopped and that side left out at
that size, said in the output and the JSON (scripts/bench_clusters.py's
memory_guard, DidNotReach); the row then has ours alone, without a ratio.
The sdiag figure is taken at the largest size both sides reached."""
from __future__ import annotations

import os

import sandboxlib as sb
from bench_clusters import jobqueue, start_cluster
from bench_ready import ready_rows
from benchlib import rpcs_served

SIZES = [int(x) for x in os.environ.get("BENCH_SCALE_SIZES", "128,256").split(",")]
# A side whose workers are not all connected by then did not reach N: said,
# and the size left out for both sides (at N=128 the reference's Nanny timed
# out its workers' start on 2 cores, and scale() does not replace them).
TIMEOUT_S = float(os.environ.get("BENCH_SCALE_TIMEOUT", "600"))
NODES = 4


def rpcs_per_job_start(side: str, n: int) -> float:
    """RPCs per job from the submission to all n workers connected (ours:
    n worker jobs and the scheduler job; the reference: n jobs)."""
    sb.run(["sdiag", "--reset"])
    if side == "ours":
        c, _ = start_cluster(f"bench-sdiag-{n}", n)
        rpcs = rpcs_served()
        c.close()
        sb.cancel_all_user_jobs(300)
        return rpcs / (n + 1)
    # The reference reads sdiag itself once all its workers are connected:
    # its cleanup is outside the count, as ours is.
    return jobqueue(n, True, ready_only=True, sdiag=True)["rpcs_at_ready"] / n


def scale_rows(figures: dict, reps: int, seed: int) -> list[tuple]:
    # Each node declares just enough CPUs for its share of the largest
    # cluster (and ours' scheduler job), so that Slurm spreads the jobs over
    # the 4 nodes: with 256 CPUs each, it placed all 128 on the first
    # (2026-12-06), whose slurmd then stopped answering under 128 launches.
    sb.sandbox_up(nodes=NODES, cpus=-(-(max(SIZES) + 1) // NODES))
    try:
        rows = ready_rows(figures, SIZES, reps, seed, measured=("ours", "jq"), guard=True,
                          timeout=TIMEOUT_S)
        left_out = figures["ready"][-1]["did_not_fit"]
        fitting = [n for n in SIZES if f"ours N={n}" not in left_out and f"jq N={n}" not in left_out]
        if not fitting:
            return rows
        n = fitting[-1]
        ours, ref = rpcs_per_job_start("ours", n), rpcs_per_job_start("jq", n)
        figures["sdiag"] = {"n": n, "ours": ours, "jq": ref}
        rows.append((f"slurmctld_rpcs_per_job_start_N{n}", ours, ref))
    finally:
        sb.sandbox_up(nodes=1, cpus=256)
    return rows
