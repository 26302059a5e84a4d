"""Figures at scale (`scripts/bench --scale`): time to ready at N = 128 and
256 (BENCH_SCALE_SIZES) on a 4-node sandbox, ours against the reference
with its Nanny and without it (scripts/bench_ready.py's blocks, shuffled,
BENCH_SCALE_REPS), and
the RPCs slurmctld served per worker job start at the largest N, from
`sdiag` (reset before each cluster, read once all its workers are
connected; by message type, with sdiag's time, in the JSON), then its RPCs per
minute while the cluster is left alone (BENCH_IDLE_S from its last worker's
connection, then BENCH_IDLE_S more: settled), for both sides.

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
The reference without its Nanny is half its processes, so it reaches sizes
the Nanny's does not (at N=256 a Nanny beside each worker needs some 30
GiB). The sdiag figure is taken at the largest size ours and a reference
reached, with its Nanny if it got there (its RPCs are its sbatch per job,
Nanny or not; the row says which: reference_variant)."""
from __future__ import annotations

import os

import sandboxlib as sb
from bench_clusters import jobqueue, start_cluster
from bench_ready import ready_rows
from benchlib import per_job_start, rpcs_by_type, rpcs_left_alone

SIZES = [int(x) for x in os.environ.get("BENCH_SCALE_SIZES", "128,256").split(",")]
# A side whose workers are not all connected by then did not reach N: said,
# and the size left out for both sides (at N=128 the reference's Nanny timed
# out its workers' start on 2 cores, and scale() does not replace them).
TIMEOUT_S = float(os.environ.get("BENCH_SCALE_TIMEOUT", "600"))
NODES = 4
# Seconds a cluster is left alone, all its workers connected, while
# slurmctld's RPCs are counted (BENCH_IDLE_S).
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "60"))
# The sides measured (BENCH_SCALE_SIDES, comma-separated): all three for a
# figure; one of ours alone (ours, or ours_tcp) to see a change of ours at a
# size, whose reference a run beside it measured (no ratio is printed
# without both sides, and no sdiag count without ours).
SIDES = tuple(os.environ.get("BENCH_SCALE_SIDES", "ours,jq,jq_no_nanny").split(","))


def rpcs_of_a_cluster(side: str, n: int) -> tuple[dict, dict, dict]:
    """slurmctld's RPCs per job (benchlib.per_job_start) from the submission
    to all n workers connected (ours: n worker jobs and the scheduler job;
    the reference, "jq" or "jq_no_nanny": n jobs), then per minute of the
    IDLE_S that follow, the cluster left alone, and per minute of the IDLE_S
    after those (settled: benchlib.rpcs_left_alone)."""
    sb.run(["sdiag", "--reset"])
    if side == "ours":
        c, _ = start_cluster(f"bench-sdiag-{n}", n)
        at_ready = rpcs_by_type()
        idle, settled = rpcs_left_alone(IDLE_S, at_ready)
        c.close()
        sb.cancel_all_user_jobs(300)
        jobs = n + 1
    else:
        # The reference reads sdiag itself: its cleanup is outside the
        # count, as ours is.
        r = jobqueue(n, side == "jq", ready_only=True, sdiag=True, idle=IDLE_S)
        at_ready, idle, settled = r["rpcs_by_type_at_ready"], r["rpcs_by_type_idle"], r["rpcs_by_type_settled"]
        jobs = n
    return per_job_start(at_ready, jobs), per_job_start(idle, IDLE_S / 60), per_job_start(settled, IDLE_S / 60)


def scale_rows(figures: dict, reps: int, seed: int) -> list[tuple]:
    # Each node declares just enough CPUs for its share of the largest
    # cluster (and ours' scheduler job), so that Slurm spreads the jobs over
    # the 4 nodes: with 256 CPUs each, it placed all 128 on the first
    # (2026-12-06), whose slurmd then stopped answering under 128 launches.
    sb.sandbox_up(nodes=NODES, cpus=-(-(max(SIZES) + 1) // NODES))
    try:
        rows = ready_rows(figures, SIZES, reps, seed, measured=SIDES, guard=True,
                          timeout=TIMEOUT_S)
        left_out = figures["ready"][-1]["did_not_fit"]
        # Per size ours reached, the references that reached it, the Nanny's first.
        reached = {n: [v for v in ("jq", "jq_no_nanny") if v in SIDES and f"{v} N={n}" not in left_out]
                   for n in SIZES if "ours" in SIDES and f"ours N={n}" not in left_out}
        fitting = [(n, refs[0]) for n, refs in reached.items() if refs]
        if not fitting:
            return rows
        n, reference = fitting[-1]
        # The health check asks slurmctld about its node every
        # HealthCheckInterval (5 s here): RPCs per second of the run, not per
        # job start, which would be charged to the slower side. Off while
        # counting (docs/performance.md states what it costs).
        sb.health_check(False)
        try:
            (ours, ours_idle, ours_settled), (ref, ref_idle, ref_settled) = (
                rpcs_of_a_cluster("ours", n), rpcs_of_a_cluster(reference, n))
        finally:
            sb.health_check(True)
        figures["sdiag"] = {"n": n, "reference": reference, "ours": ours["rpcs"], "jq": ref["rpcs"], "idle_s": IDLE_S,
                            "ours_per_job_start": ours, "jq_per_job_start": ref,
                            "ours_idle_per_minute": ours_idle, "jq_idle_per_minute": ref_idle,
                            "ours_settled_per_minute": ours_settled, "jq_settled_per_minute": ref_settled}
        which = {"reference_variant": reference}
        rows.append((f"slurmctld_rpcs_per_job_start_N{n}", ours["rpcs"], ref["rpcs"], which))
        # (sdiag's time serving them is in the JSON, not a row: on this
        # machine it is mostly the wait for a core while the workers start,
        # 0.9 to 16 ms for the same squeue in three runs.)
        # A cluster left alone: its RPCs per minute (both sides include the
        # sandbox's own: node registrations, the bench's sdiag reads).
        rows.append((f"slurmctld_rpcs_per_minute_idle_N{n}", ours_idle["rpcs"], ref_idle["rpcs"], which))
        # The minute after: the same cluster settled.
        rows.append((f"slurmctld_rpcs_per_minute_settled_N{n}", ours_settled["rpcs"], ref_settled["rpcs"],
                     which))
    finally:
        sb.sandbox_up(nodes=1, cpus=256)
    return rows
