"""Side-by-side figures: dask-spank against dask-jobqueue and the Nanny, in
one run on the same sandbox (run through scripts/bench)."""
from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandboxlib as sb  # noqa: E402
from bench_control import control_plane  # noqa: E402
from bench_handover import handover_rows  # noqa: E402
from bench_memory import memory_rows  # noqa: E402
from bench_ready import interval_row, ready_once, ready_rows  # noqa: E402
from bench_scale import scale_rows  # noqa: E402
from bench_tls import tls_rows  # noqa: E402
from benchlib import median  # noqa: E402

SIZES = [int(x) for x in os.environ.get("BENCH_SIZES", "8,32,64").split(",")]
# Repetitions of figures 1 to 4 (each a median with a 95 % interval: 6 is
# the fewest that reach 95 % with the extremes), at the memory figures' N.
REPS = int(os.environ.get("BENCH_REPS", "6"))
MEMORY_N = int(os.environ.get("BENCH_MEMORY_N", str(SIZES[0])))
# Repetitions at scale (BENCH_SCALE_REPS, default BENCH_REPS): a repetition
# of N=128 takes minutes here, so a whole run may take fewer.
SCALE_REPS = int(os.environ.get("BENCH_SCALE_REPS", str(REPS)))


# Times sbatch from inside the user's own process, so that the cost of
# becoming the user (runuser) is not part of what is compared. The three
# kinds alternate, so that drift of the machine hits them alike.
_SBATCH_TIMER = r"""
import json, statistics, subprocess, sys, time
reps, noplugin, noop_c, noop_c_gcc_s, noop_rust = int(sys.argv[1]), *sys.argv[2:6]
kinds = {
    "with_plugin": (["--wrap=true"], {}),
    "without": (["--wrap=true"], {"SLURM_CONF": noplugin}),
    "dask_job": (["--dask-role=worker", "--dask-cluster=bench-sbatch"], {}),
    "noop_c": (["--wrap=true"], {"SLURM_CONF": noop_c}),
    "noop_c_gcc_s": (["--wrap=true"], {"SLURM_CONF": noop_c_gcc_s}),
    "noop_rust": (["--wrap=true"], {"SLURM_CONF": noop_rust}),
}
import os
ts = {k: [] for k in kinds}
for i in range(reps):
    order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
    for k in order:
        args, env = kinds[k]
        t = time.monotonic()
        subprocess.run(["sbatch", "--hold", "-o", "/dev/null", *args], check=True,
                       capture_output=True, env={**os.environ, **env})
        ts[k].append(time.monotonic() - t)
print(json.dumps({k: statistics.median(v) for k, v in ts.items()}))
"""


# Two SPANK plugins that do nothing, to tell the cost of loading any
# plugin, and any Rust cdylib (std, libgcc_s), from the cost of ours.
_NOOP_C = """
#include <slurm/spank.h>
SPANK_PLUGIN(noop, 1);
int slurm_spank_init(spank_t sp, int ac, char **av) { return 0; }
"""
_NOOP_RUST = """
use std::os::raw::{c_char, c_int, c_uint, c_void};
#[no_mangle] pub static plugin_name: [u8; 5] = *b"noop\\0";
#[no_mangle] pub static plugin_type: [u8; 6] = *b"spank\\0";
#[no_mangle] pub static plugin_version: c_uint = VERSION;
#[no_mangle] pub static spank_plugin_version: c_uint = 1;
#[no_mangle]
pub extern "C" fn slurm_spank_init(_sp: *mut c_void, _ac: c_int, _av: *mut *mut c_char) -> c_int {
    std::env::args().count() as c_int * 0
}
"""


def _slurm_conf_with(d, plugstack: str) -> str:
    """A copy of the sandbox's slurm.conf whose plugstack.conf is `plugstack`."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "plugstack.conf").write_text(plugstack)
    conf = [l for l in (sb.STATE / "etc" / "slurm.conf").read_text().splitlines() if not l.startswith("PlugStackConfig=")]
    conf.append(f"PlugStackConfig={d / 'plugstack.conf'}")
    (d / "slurm.conf").write_text("\n".join(conf) + "\n")
    return str(d / "slurm.conf")


def _noop_plugins() -> tuple[str, str, str]:
    """Do-nothing plugins: in C, in C but loading libgcc_s (which every Rust
    cdylib needs, for unwinding), and in Rust."""
    d = sb.WORK / "bench-noop"
    d.mkdir(exist_ok=True)
    (d / "noop.c").write_text(_NOOP_C)
    sb.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(d / "noop_c.so"), str(d / "noop.c")])
    sb.run(["gcc", "-shared", "-fPIC", "-O2", "-Wl,--no-as-needed", "-o", str(d / "noop_c_gcc_s.so"),
            str(d / "noop.c"), "-lgcc_s"])
    version = next(l.split()[2] for l in open("/usr/include/slurm/slurm_version.h")
                   if l.startswith("#define SLURM_VERSION_NUMBER"))
    (d / "noop.rs").write_text(_NOOP_RUST.replace("VERSION", version))
    sb.run(["rustc", "--edition=2021", "--crate-type=cdylib", "-C", "opt-level=3", "-C", "panic=unwind",
            "-o", str(d / "noop_rust.so"), str(d / "noop.rs")])
    return (_slurm_conf_with(d / "c", f"required {d / 'noop_c.so'}\n"),
            _slurm_conf_with(d / "c_gcc_s", f"required {d / 'noop_c_gcc_s.so'}\n"),
            _slurm_conf_with(d / "rust", f"required {d / 'noop_rust.so'}\n"))


def sbatch_cost(reps: int = 60) -> tuple[dict, float]:
    """Median wall time of one sbatch: plain job with the plugin, plain job
    without it (a slurm.conf whose plugstack.conf is empty), a dask job
    (--dask-role, re-exec with the site defaults), and plain jobs with a
    do-nothing plugin in C and in Rust. And the user-space instructions of
    one plain sbatch with the plugin over those without it, counted by
    callgrind: unlike wall time, repeatable to the instruction."""
    noplugin = _slurm_conf_with(sb.WORK / "bench-noplugin", "")
    noop_c, noop_c_gcc_s, noop_rust = _noop_plugins()
    os.system(f"chown -R {sb.TEST_USER}: {sb.WORK / 'bench-noplugin'} {sb.WORK / 'bench-noop'}")
    p = sb.as_user(["/usr/bin/python3", "-c", _SBATCH_TIMER, str(reps), noplugin, noop_c, noop_c_gcc_s, noop_rust],
                   timeout=1800)
    t = json.loads(p.stdout)

    def instructions(env=None) -> int:
        p = sb.as_user(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                        "sbatch", "--hold", "-o", "/dev/null", "--wrap=true"], env=env)
        return int(p.stderr.split("Collected :")[1].split()[0])

    ratio = instructions() / instructions({"SLURM_CONF": noplugin})
    sb.cancel_all_user_jobs(120)
    return t, ratio


def comparison_rows(figures: dict, seed: int) -> list[tuple]:
    """Figures 1-4: dask-spank against dask-jobqueue (with its Nanny, and
    without: the floor of Slurm and a cold Python start), each repeated
    REPS times in shuffled blocks (scripts/bench_ready.py,
    scripts/bench_memory.py); then the cores-declared and sbatch figures."""
    rows = ready_rows(figures, SIZES, REPS, seed)
    rows += memory_rows(figures, MEMORY_N, REPS, seed)
    rows += cores_declared_rows(figures, seed)
    return rows + sbatch_rows(figures)


def cores_declared_rows(figures: dict, seed: int) -> list[tuple]:
    """Figure 1 without CPU oversubscription: the node declares the real
    core count and the cluster fits in it (ours: a scheduler job and
    nproc-1 worker jobs; the reference: as many worker jobs, its scheduler
    lives in the client), so the figure is the start latency of a job, not
    the number of Pythons competing for 2 cores. After the restart this
    needs, one unmeasured cluster of each side; then REPS of each in a
    shuffled order; the node's 256 cpus are back afterwards."""
    n = max(1, (os.cpu_count() or 2) - 1)
    sb.sandbox_up(nodes=1, cpus=os.cpu_count() or 2)
    try:
        ready_once("ours", n, "cores-warmup")
        ready_once("jq", n, "cores-warmup")
        order = ["ours", "jq"] * REPS
        random.Random(seed).shuffle(order)
        times: dict[str, list[float]] = {"ours": [], "jq": []}
        for i, side in enumerate(order):
            times[side].append(ready_once(side, n, f"cores-{i}"))
    finally:
        sb.sandbox_up(nodes=1, cpus=256)
    figures["cores_declared"] = {"n": n, "order": order, **times}
    return [interval_row(f"time_to_ready_s_N{n}_cores_declared", times["ours"], times["jq"])]


def sbatch_rows(figures: dict) -> list[tuple]:
    """Figure 5: what the plugin costs sbatch (`scripts/bench --sbatch` alone)."""
    rows = []
    t, instr = sbatch_cost()
    figures["sbatch"] = t
    wo = t["without"]
    rows.append(("sbatch_s_plain_job", t["with_plugin"], wo))
    rows.append(("sbatch_instructions_plain_job_ratio", instr, 1.0))
    rows.append(("sbatch_s_plain_job_noop_c_plugin", t["noop_c"], wo))
    rows.append(("sbatch_s_plain_job_noop_c_plugin_with_libgcc_s", t["noop_c_gcc_s"], wo))
    rows.append(("sbatch_s_plain_job_noop_rust_plugin", t["noop_rust"], wo))
    rows.append(("sbatch_s_dask_job_vs_plain_without_plugin", t["dask_job"], wo))
    return rows


def cli_status_of_queued(n: int) -> dict:
    """Readiness aggregation on the user's side: `dask-spank status` of a
    cluster with n worker jobs in the queue (one held array; real Slurm
    state, nothing runs), median of 5; and `dask-spank wait` reporting them
    pending."""
    name = "bench-agg"
    sb.forget_cluster(name)
    sb.sbatch("--hold", "--dask-role=scheduler", f"--dask-cluster={name}")
    sb.sbatch("--hold", "--dask-role=worker", f"--dask-cluster={name}", f"--array=1-{n}")
    lat = []
    for _ in range(5):
        t = time.monotonic()
        p = sb.as_user(["dask-spank", "status", name, "--json"])
        lat.append(time.monotonic() - t)
    v = json.loads(p.stdout)
    out = {"cli_status_s_median": median(lat), "workers_listed": len(v["workers"]),
           "pending": v["pending"]}
    sb.cancel_all_user_jobs(120)
    return out


def control_rows(figures: dict) -> list[tuple]:
    """Figure 5: one agent, BENCH_STUB_JOBS stub worker jobs. The reference
    is the target where the issue sets one; throughput and latency have no
    reference run (no other tool has a node agent) and print '-'."""
    c = control_plane()
    figures["control"] = c
    # The watchdog at its busiest: every worker at its memory limit (a 2 MiB
    # job, whose kill threshold of 1 MiB the stub's 1.8 MB sit at, rounded
    # down), so each is read at every tick, as the Nanny reads each of its
    # workers.
    hot = control_plane(job_mem_mb=2)
    figures["control_at_limit"] = hot
    n = c["jobs"]
    agg = cli_status_of_queued(n)
    figures["cli_status"] = agg
    if agg["workers_listed"] != n or agg["pending"] != n:
        raise RuntimeError(f"dask-spank status did not list {n} pending worker jobs: {agg}")
    nanny_runs = [r["per_job_pss_mib"] for r in figures.get("memory", {}).get("jq", [])]
    nanny = median(nanny_runs) if nanny_runs else None
    return [
        # Figure 2 again, resolved: the growth over 64 jobs is within what
        # the allocator already holds; over 3000 it is not.
        (f"supervision_rss_mib_per_worker_{n}_jobs", (c["agent_rss_mib"] - c["agent_rss_empty_mib"]) / n, nanny),
        (f"cli_status_{n}_queued_worker_jobs_s_median", agg["cli_status_s_median"], None),
        (f"control_agent_rss_mib_{n}_jobs_vs_64", c["agent_rss_mib"], 64.0),
        (f"control_agent_idle_cpu_percent_{n}_jobs_vs_1", c["agent_idle_cpu_percent"], 1.0),
        (f"control_agent_cpu_percent_{n}_jobs_at_their_memory_limit", hot["agent_idle_cpu_percent"], None),
        ("control_registrations_per_s", c["registrations_per_s"], None),
        ("control_starts_per_s", c["starts_per_s"], None),
        (f"control_status_{n}_jobs_s_median", c["status_s_median"], None),
        (f"control_teardown_{n}_jobs_s", c["teardown_s"], None),
    ]


def row(name: str, ours: float, reference: float | None, detail: dict | None = None) -> dict:
    """A figure: ours, the reference, their ratio (for a repeated figure,
    the median of the ratios of its repetitions, and their interval)."""
    out = {"name": name, "ours": ours, "reference": reference, "ratio": ours / reference if reference else None}
    return {**out, **(detail or {})}


def print_rows(rows: list[dict]) -> None:
    print(f"{'name':58s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}  interval of the ratio")
    for r in rows:
        ref = f"{r['reference']:10.3f}" if r["reference"] is not None else f"{'-':>10s}"
        rat = f"{r['ratio']:7.3f}" if r["ratio"] is not None else f"{'-':>7s}"
        ci = (f"  [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}] ({r['coverage']:.0%}, n={r['reps']})"
              if "ratio_low" in r else "")
        # A figure whose reference is not the usual one says which it is.
        which = f"  (reference: {r['reference_variant']})" if "reference_variant" in r else ""
        print(f"{r['name']:58s} {r['ours']:10.3f} {ref} {rat}{ci}{which}")


def medians(runs: list[list[dict]]) -> list[dict]:
    """Per figure, the median over runs of ours, of the reference and of the
    ratio (each ratio taken within its own run)."""
    out = []
    for i, first in enumerate(runs[0]):
        col = [run[i] for run in runs]
        med = {"name": first["name"], "ours": median([c["ours"] for c in col])}
        for k in ("reference", "ratio"):
            vals = [c[k] for c in col if c[k] is not None]
            med[k] = median(vals) if vals else None
        out.append(med)
    return out


# The figures of each mode (`scripts/bench --MODE`; none: the whole run).
MODES = {
    "control": lambda figures, seed: control_rows(figures),
    "sbatch": lambda figures, seed: sbatch_rows(figures),
    "handover": lambda figures, seed: handover_rows(figures),
    "ready": lambda figures, seed: ready_rows(figures, SIZES, REPS, seed),
    "cores": lambda figures, seed: cores_declared_rows(figures, seed),
    "memory": lambda figures, seed: memory_rows(figures, MEMORY_N, REPS, seed),
    "tls": lambda figures, seed: tls_rows(figures, REPS, seed),
    "scale": lambda figures, seed: scale_rows(figures, SCALE_REPS, seed),
    None: lambda figures, seed: comparison_rows(figures, seed) + tls_rows(figures, REPS, seed)
    + scale_rows(figures, SCALE_REPS, seed) + control_rows(figures),
}


def main() -> int:
    """One run, or BENCH_RUNS runs and the medians of their figures."""
    if "--first-result" in sys.argv[1:]:
        import bench_first

        return bench_first.main()
    modes = [a[2:] for a in sys.argv[1:] if a[2:] in MODES]
    mode = modes[0] if modes else None
    n_runs = int(os.environ.get("BENCH_RUNS", "1"))
    # The shuffles' seed, printed and recorded: a run's order can be replayed.
    seed = int(os.environ.get("BENCH_SEED", str(int(time.time()))))
    sb.sandbox("up")
    print(f"seed {seed} (BENCH_SEED={seed} replays this run's order)", flush=True)
    name = f"bench-{mode}" if mode else "bench"
    if sb.SLURM_RELEASE != sb.HOST_SLURM:
        name += f"-slurm-{sb.SLURM_RELEASE}"
    path = sb.REPO / "target" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    slurm = sb.run(["sinfo", "-V"]).stdout.split()[1]

    def record(runs, details):
        # After every run: a run that hangs later leaves the earlier ones.
        detail = {"figures": medians(runs), "runs": runs, "detail": details, "sizes": SIZES,
                  "runs_planned": n_runs, "seed": seed, "reps": REPS, "scale_reps": SCALE_REPS,
                  "memory_n": MEMORY_N,
                  "machine": {"nproc": os.cpu_count(), "uname": os.uname().release},
                  "slurm": slurm}
        path.write_text(json.dumps(detail, indent=2))

    runs, details = [], []
    for i in range(n_runs):
        figures: dict = {}
        rows = [row(*r) for r in MODES[mode](figures, seed + i)]
        if n_runs > 1:
            print(f"\nrun {i + 1} of {n_runs}")
        print_rows(rows)
        runs.append(rows)
        details.append(figures)
        record(runs, details)
    if n_runs > 1:
        print(f"\nmedians of {n_runs} runs")
        print_rows(medians(runs))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
