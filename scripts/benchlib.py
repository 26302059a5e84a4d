"""Measurements shared by both sides of scripts/bench (ours, run as root,
and dask-jobqueue's, run as the test user): only the standard library."""
from __future__ import annotations

import math
import os
import re
import signal
import statistics
import subprocess
import time


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def uss_mib(pid: int) -> float:
    """Memory only this process holds (private pages): what it costs beyond
    the pages it shares with others, such as a parent it was forked from."""
    kib = 0
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
    return kib / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: each shared page counted in part, so that the
    sum over processes is what they cost together. The same measure for
    both sides of every memory figure."""
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def parent(pid: int) -> int:
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat[stat.rfind(")") + 2:].split()[1])


def _kids() -> dict[int, list[int]]:
    """Every live process's children, by parent PID, from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                kids.setdefault(parent(int(d)), []).append(int(d))
            except OSError:
                continue
    return kids


def children(pid: int) -> list[int]:
    """The direct children of `pid`."""
    return _kids().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid`."""
    kids, out, todo = _kids(), [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def restart_latencies(client, n: int, kills: int = 5) -> list[float]:
    """SIGKILL a worker, time until a worker of the same name registers
    again; `kills` times, a different worker each time (while there are any
    left), so that what is timed is the restart itself, not a crash-loop
    backoff. Waits for all `n` workers between kills."""
    killed: set[str] = set()
    lat = []
    for _ in range(kills):
        ws = client.scheduler_info()["workers"]
        pids = client.run(os.getpid)
        fresh = sorted(a for a in pids if ws[a]["name"] not in killed) or sorted(pids)
        addr = fresh[0]
        name = ws[addr]["name"]
        killed.add(name)
        t0 = time.monotonic()
        os.kill(pids[addr], signal.SIGKILL)
        while not any(w["name"] == name and a != addr for a, w in client.scheduler_info()["workers"].items()):
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"worker {name} not back 60 s after SIGKILL")
            time.sleep(0.005)
        lat.append(time.monotonic() - t0)
        client.wait_for_workers(n, timeout=60)
    return lat


def work_for(c, n: int, seconds: float) -> int:
    """`seconds` of work on every worker, four tasks per worker at a time;
    how many tasks ran."""
    def work(i: int) -> int:
        """A task that allocates and touches memory (a forked worker's pages
        stop being shared with its fork server) for about a tenth of a
        second. Nested: pickled by value, since the workers cannot import
        the bench's files."""
        import time

        end = time.monotonic() + 0.1
        total = 0
        while time.monotonic() < end:
            total += sum(bytearray(1 << 20))
        return total + i

    end, done = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        c.gather(c.map(work, range(done, done + 4 * n), pure=False))
        done += 4 * n
    return done


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def median_interval(xs: list[float]) -> tuple[float, float, float]:
    """(low, high, coverage): the widest-inside order statistics
    x(k) <= median <= x(n+1-k) with a coverage of at least 95 %, or the
    extremes with theirs when there are too few runs for 95 %."""
    xs, n = sorted(xs), len(xs)

    def coverage(k: int) -> float:
        below = sum(math.comb(n, i) for i in range(k)) / 2 ** n
        return 1 - 2 * below

    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= 0.95:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def did_not_reach(client, error: TimeoutError, n: int, timeout: float) -> str:
    """What a side that did not get to n workers in time reports (both
    sides say it alike: ours in bench_clusters, the reference's script).
    The count is the one wait_for_workers last read (its
    WorkerStartTimeoutError carries it), not Client.scheduler_info(): that
    returns the client's cache, which a periodic refresh asked with
    n_workers=0 can overwrite with no workers (run L read 0 of 256 where
    its scheduler had some 118)."""
    got = getattr(error, "available_workers", None)
    if got is None:
        got = len(client.sync(client.scheduler.identity, n_workers=-1)["workers"])
    return f"{got} of {n} workers connected after {timeout:.0f} s"


def rpcs_by_type() -> dict[str, dict[str, int]]:
    """slurmctld's RPCs by message type since sdiag's last reset (any user
    may read sdiag; only root resets it): for each type, its count and the
    controller's total time serving it (microseconds)."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, check=True).stdout
    section = out.split("Remote Procedure Call statistics by message type", 1)[-1]
    section = section.split("Remote Procedure Call statistics by user", 1)[0]
    found = {m["type"]: {"count": int(m["count"]), "total_us": int(m["total"])}
             for m in re.finditer(r"^\s*(?P<type>\w+)\s+\(\s*\d+\)\s+count:\s*(?P<count>\d+)"
                                  r"\s+ave_time:\s*\d+\s+total_time:\s*(?P<total>\d+)", section, re.M)}
    if not found:
        # Reading sdiag is itself an RPC of the section: empty means the
        # format changed, which must not read as "no RPCs".
        raise RuntimeError(f"sdiag printed no RPC counts by message type:\n{out}")
    return found


def rpcs_between(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The RPCs of the reading `after` that the reading `before` had not
    counted (no reset: the reference's side runs as the user, who may read
    sdiag but not reset it)."""
    zero = {"count": 0, "total_us": 0}
    return {k: {f: t[f] - before.get(k, zero)[f] for f in zero}
            for k, t in after.items() if t["count"] != before.get(k, zero)["count"]}


def rpcs_since(before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """`rpcs_by_type` served since the reading `before`."""
    return rpcs_between(before, rpcs_by_type())


def rpcs_left_alone(seconds: float, before: dict[str, dict[str, int]]) -> tuple[dict, dict]:
    """What a cluster, every worker connected and no work, asks of
    slurmctld in two windows of `seconds` one after the other (both sides of
    `--scale`'s idle figures): the first starts when its last worker
    connected, so its start-up tail is in it (our keeper still steps every
    interval until a step sees nothing move); the second is the cluster
    settled."""
    time.sleep(seconds)
    middle = rpcs_by_type()
    time.sleep(seconds)
    return rpcs_between(before, middle), rpcs_since(middle)


def per_job_start(by_type: dict[str, dict[str, int]], jobs: int) -> dict:
    """`rpcs_by_type` per job started (or per any other unit: a minute):
    the RPCs, the controller's time serving them (microseconds), and both
    by message type."""
    return {"rpcs": sum(t["count"] for t in by_type.values()) / jobs,
            "time_us": sum(t["total_us"] for t in by_type.values()) / jobs,
            "by_type": {k: {f: v / jobs for f, v in t.items()} for k, t in sorted(by_type.items())}}
