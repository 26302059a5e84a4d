"""One cluster of each side of scripts/bench, started and timed the same
way by every figure: ours through sbatch (the plugin and the agent), the
reference (dask-jobqueue's SLURMCluster) as the test user."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any, Callable

import sandboxlib as sb
from benchlib import did_not_reach


def attach_pids(role: str | None = None) -> list[int]:
    """The `dask-spank attach` processes (of the jobs of this role: its
    DASK_SPANK_ROLE, which the plugin puts in the job's environment)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
                if not (len(cmd) > 1 and cmd[0].endswith(b"dask-spank") and cmd[1] == b"attach"):
                    continue
                env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if role is None or f"DASK_SPANK_ROLE={role}".encode() in env:
                out.append(int(d))
    return out


class DidNotReach(Exception):
    """A cluster whose workers did not all connect in the time given."""


def start_cluster(name: str, n: int, timeout: float = 900):
    """Submit a scheduler and n worker jobs; the client once all n are
    connected, and the seconds from the first sbatch (DidNotReach if they
    are not all connected `timeout` seconds after it). A bench cluster is
    always new: the TLS credentials an earlier cluster of this name left
    (forget_cluster keeps them) go too, or a TCP cluster's client would
    take them and refuse its plain connection."""
    sb.forget_cluster(name, credentials=True)
    t0 = time.monotonic()

    def left() -> float:
        # One deadline from the first sbatch for the client's connection
        # and the wait (the reference's wait starts after its scheduler,
        # in its own process, is up: a few seconds less than ours). The
        # client's 30 s default failed a whole run (P) where a scheduler
        # starved by 256 starting workers answered it later.
        return max(1.0, t0 + timeout - time.monotonic())

    sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}")
    sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", f"--array=1-{n}")
    sb.wait_scheduler_file(name, 300)
    try:
        c = sb.client(name, timeout=left())
    except (OSError, TimeoutError) as e:
        raise DidNotReach(f"no client connected to its scheduler within {timeout:.0f} s "
                          f"({type(e).__name__})") from None
    try:
        c.wait_for_workers(n, timeout=left())
    except TimeoutError as e:
        why = did_not_reach(c, e, n, timeout)
        c.close()
        raise DidNotReach(why) from None
    except BaseException:
        c.close()
        raise
    return c, time.monotonic() - t0


class OutOfMemory(Exception):
    """A cluster that would have taken the machine's last memory."""


# This machine has no swap: a cluster that does not fit would wake the
# kernel's OOM killer, which picks the largest process, not the bench's.
MEMORY_FLOOR_MIB = int(os.environ.get("BENCH_MEMORY_FLOOR_MIB", "2048"))


def mem_available_mib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


@contextlib.contextmanager
def memory_guard(seen: dict):
    """Raises OutOfMemory in the main thread (through SIGUSR1, which
    interrupts its waits) once MemAvailable falls below MEMORY_FLOOR_MIB;
    seen["lowest_mib"] is the least seen. The caller cancels the jobs."""
    done = threading.Event()
    seen["lowest_mib"] = mem_available_mib()

    def watch():
        while not done.wait(0.25):
            seen["lowest_mib"] = min(seen["lowest_mib"], mem_available_mib())
            if seen["lowest_mib"] < MEMORY_FLOOR_MIB:
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    def trip(signum, frame):
        raise OutOfMemory(f"{seen['lowest_mib']} MiB of memory left (floor {MEMORY_FLOOR_MIB} MiB)")

    before = signal.signal(signal.SIGUSR1, trip)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        done.set()
        t.join()
        # A signal sent just as the block ended may still be on its way:
        # then it finds a handler that does nothing, not the default (exit).
        tripped = seen["lowest_mib"] < MEMORY_FLOOR_MIB
        signal.signal(signal.SIGUSR1, (lambda *_: None) if tripped else before)


def jobqueue(n: int, nanny: bool, ready_only: bool = False, sdiag: bool = False,
             timeout: float | None = None, idle: float = 0, work: float = 0) -> dict:
    """The reference: dask-jobqueue for one size, as the test user (with
    sdiag, the RPCs slurmctld served until all its workers connected, and
    with `idle`, those of that many seconds after, the cluster left alone,
    and of as many again, settled;
    with a timeout, DidNotReach if they did not all connect in that time;
    with `work`, that many seconds of work and then the whole job's PSS)."""
    args = [str(sb.VENV / "bin" / "python"), str(sb.REPO / "scripts" / "bench_jobqueue.py"), str(n)]
    args += ([] if nanny else ["--no-nanny"]) + (["--ready-only"] if ready_only else [])
    args += (["--sdiag"] if sdiag else []) + (["--timeout", str(timeout)] if timeout else [])
    args += ["--idle", str(idle)] if idle else []
    args += ["--work", str(work)] if work else []
    for attempt in (1, 2):
        p = sb.as_user(args, check=False, timeout=3600)
        sb.cancel_all_user_jobs(120)
        if p.returncode == 0:
            res = json.loads(p.stdout.strip().splitlines()[-1])
            if "did_not_reach" in res:
                raise DidNotReach(res["did_not_reach"])
            return res
        # Said, and measured again once. Seen on 2026-11-30 when the reference
        # also measured restarts at N=64: its Nanny did not bring a killed
        # worker back within 60 s, twice in a row.
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        print(f"the reference failed at N={n} (attempt {attempt}): {tail}", file=sys.stderr, flush=True)
    raise RuntimeError(f"the reference failed twice at N={n}")


def run_blocks(blocks: dict[str, tuple[str, list]], reps: int, seed: int,
               warm_up: Callable[[list], None], measure: Callable[[int, Any], None],
               fresh_sandbox: bool = False) -> None:
    """The design of every repeated figure. `blocks` maps a block's name to
    the policy keys of its sandbox configuration and its cells (what it
    measures). Each repetition runs the blocks in a shuffled order; a block
    whose configuration differs from the one before applies it (slurmd
    restarts) and runs warm_up(cells), unmeasured, since the first cluster
    after a restart is cold; then measure(rep, cell) for each cell, in a
    shuffled order. The sandbox's own policy is back afterwards.

    With `fresh_sandbox`, each repetition starts from a sandbox stopped
    and started again (every daemon new; then each block's warm-up): for
    near-deterministic figures (memory) whose spread within one sandbox
    start is narrower than what changes from one start to the next, so
    that their interval covers a second run's."""
    rng = random.Random(seed)
    last = None
    try:
        for rep in range(reps):
            if fresh_sandbox:
                sb.sandbox("down")
                sb.sandbox("up")
                last = None
            order = list(blocks)
            rng.shuffle(order)
            for name in order:
                policy, cells = blocks[name]
                if policy != last:
                    sb.set_policy(policy)
                    warm_up(cells)
                    last = policy
                cells = list(cells)
                rng.shuffle(cells)
                for cell in cells:
                    measure(rep, cell)
    finally:
        sb.set_policy("")
