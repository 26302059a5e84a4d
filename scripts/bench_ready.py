"""Figure 1 of scripts/bench: time to ready (every worker connected), ours
over TLS and over plain TCP against the reference with its Nanny and
without it, free of order effects.

The site's TLS setting is a plugstack.conf key, so changing it restarts
slurmd, and the first cluster after a restart is cold (measured 1.3x at
N=8). So the variants are measured in two blocks, one per configuration:
ours over TLS and both reference variants (the reference's plain jobs do
not depend on that key) in one, ours over TCP in the other. Each block
starts with its configuration applied and one unmeasured cluster of each
side that it holds, then measures every size of its variants in a shuffled
order. A repetition is both blocks, in a shuffled order; every ratio is
taken within its repetition, and each figure is the median over the
repetitions with a distribution-free 95 % interval (benchlib)."""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import statistics

import sandboxlib as sb
from bench_clusters import DidNotReach, OutOfMemory, jobqueue, memory_guard, run_blocks, start_cluster
from benchlib import median_interval

# The blocks: the policy keys each applies, and the variants it measures.
BLOCKS = {"tls": ("", ("ours", "jq", "jq_no_nanny")), "tcp": ("tls=off", ("ours_tcp",))}
# What each ratio of figure 1 compares: ours, and the reference variant.
RATIOS = {"": "jq", "_vs_no_nanny": "jq_no_nanny", "_tls_vs_tcp": "ours_tcp"}
_WARM_UPS = itertools.count()


def ready_once(variant: str, n: int, tag: str, timeout: float = 900) -> float:
    """Seconds from the first sbatch (or SLURMCluster()) to n connected
    workers, the cluster cleaned up after (DidNotReach past `timeout`)."""
    if variant.startswith("ours"):
        # Each variant its own name: a TLS cluster's credentials would be
        # found first by a TCP one of the same name.
        try:
            c, seconds = start_cluster(f"bench-{variant.replace('_', '-')}-{n}-{tag}", n, timeout)
        except BaseException:
            sb.cancel_all_user_jobs(300)
            raise
        c.close()
        sb.cancel_all_user_jobs(120)
        return seconds
    return jobqueue(n, variant == "jq", ready_only=True, timeout=timeout)["ready"][str(n)]


def warm_up(variants: tuple[str, ...]) -> None:
    """One unmeasured two-worker cluster of each side the block measures
    (a name of its own each time: a TLS cluster's credentials would be
    found first by a TCP one of the same name)."""
    c, _ = start_cluster(f"bench-warmup-{next(_WARM_UPS)}", 2)
    c.close()
    sb.cancel_all_user_jobs(120)
    if any(v.startswith("jq") for v in variants):
        jobqueue(2, True, ready_only=True)


def interval_row(name: str, ours: list[float], ref: list[float]) -> tuple:
    """A row: the medians of both sides and, from the ratios of each
    repetition, the median ratio and its interval."""
    ratios = [o / r for o, r in zip(ours, ref)]
    lo, hi, cov = median_interval(ratios)
    return (name, statistics.median(ours), statistics.median(ref),
            {"ratio": statistics.median(ratios), "ratio_low": lo, "ratio_high": hi, "coverage": cov,
             "reps": len(ratios), "ours_runs": ours, "reference_runs": ref})


def stop_reference_clients() -> None:
    """The reference's client processes this bench started (runuser does
    not pass on the kill an interrupted as_user gives it), by PID."""
    uid = sb.user().pw_uid
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid and \
                    b"bench_jobqueue.py" in open(f"/proc/{d}/cmdline", "rb").read():
                os.kill(int(d), signal.SIGKILL)
        except OSError:
            continue


def ready_rows(figures: dict, sizes: list[int], reps: int, seed: int,
               measured: tuple[str, ...] = ("ours", "ours_tcp", "jq", "jq_no_nanny"),
               guard: bool = False, timeout: float = 900) -> list[tuple]:
    """The figure for these sizes and variants (`measured`).
    With `guard`, a cluster that would take the machine's last memory, or
    whose workers do not all connect within `timeout`, is stopped and that
    variant left out at that size (figures["ready"]'s did_not_fit says
    why: a result too, printed); where the reference is left out, the row
    has ours alone, without a ratio."""
    blocks = {b: (policy, [(v, n) for v in vs if v in measured for n in sizes]) for b, (policy, vs) in BLOCKS.items()}
    blocks = {b: pc for b, pc in blocks.items() if pc[1]}
    times: dict[str, dict[int, list[float]]] = {v: {n: [] for n in sizes} for _, cells in blocks.values()
                                               for v, _ in cells}
    order = []
    # "VARIANT N=n" -> why that side could not be measured at that size.
    did_not_fit: dict[str, str] = {}

    def measure(rep: int, cell: tuple[str, int]) -> None:
        v, n = cell
        if f"{v} N={n}" in did_not_fit:
            return
        try:
            with memory_guard({}) if guard else contextlib.nullcontext():
                seconds = ready_once(v, n, str(rep), timeout)
        except (OutOfMemory, DidNotReach) as e:
            if not guard:
                raise
            stop_reference_clients()
            sb.cancel_all_user_jobs(300)
            did_not_fit[f"{v} N={n}"] = str(e)
            print(f"  ready: {v} at N={n} left out ({e})", flush=True)
            return
        times[v][n].append(seconds)
        order.append((rep, v, n, seconds))
        print(f"  ready: rep {rep + 1}/{reps} {v:<12} N={n:<4} {seconds:7.2f} s", flush=True)

    run_blocks(blocks, reps, seed, lambda cells: warm_up(tuple(v for v, _ in cells)), measure)
    figures.setdefault("ready", []).append({"seed": seed, "reps": reps, "order": order, "times": times,
                                            "did_not_fit": did_not_fit})
    rows = []
    for n in sizes:
        for suffix, ref in RATIOS.items():
            name = f"time_to_ready_s_N{n}{suffix}"
            # A ratio needs both of its sides measured (BENCH_SCALE_SIDES
            # can leave either out).
            if "ours" not in times or ref not in times or f"ours N={n}" in did_not_fit:
                continue
            if f"{ref} N={n}" in did_not_fit:
                # Ours alone: the reference did not get there (a row without a ratio).
                rows.append((name, statistics.median(times["ours"][n]), None,
                             {"reference_left_out": did_not_fit[f"{ref} N={n}"], "ours_runs": times["ours"][n]}))
            else:
                rows.append(interval_row(name, times["ours"][n], times[ref][n]))
    return rows
