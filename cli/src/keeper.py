# dask-spank keeper: runs in the scheduler job, as the user, for the life of
# the cluster (started by `dask-spank attach` with the job's own Python).
# It holds the cluster's size: the target the user recorded (`dask-spank
# up --workers N`, `scale`, `SpankCluster.scale`) or dask's own adaptive
# target between a minimum and a maximum (`--adapt MIN:MAX`, `adapt`).
#
# Every few seconds: read the intention (target.json), the cluster's worker
# jobs (squeue) and the scheduler's state; submit worker jobs with plain
# sbatch (the same policy path as any submission) for what is missing,
# counting out the workers about to retire for their walltime (so their
# successors are submitted ahead of time); retire and cancel the extra ones
# (those holding no unique data first, through dask). One line per decision
# in the scheduler job's log; the state in keeper.json for `dask-spank
# status`. Refusals by Slurm (queue limits) are retried with a backoff; a
# refused batch is tried smaller (halved) at once, so that a cluster at a
# limit takes what the limit allows rather than nothing.
# Every TICK it also lists the connected workers in connected.json, which
# status, wait and ls read.

#
# argv: cluster name, cluster directory, successor lead (s), lifetime margin
# (s), scheduler job id.
import json
import os
import re
import subprocess
import sys
import time

NAME, DIR, LEAD, MARGIN, SCHED_JOB = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
STARTED = time.time()
INTERVAL = float(os.environ.get("DASK_SPANK_KEEPER_INTERVAL", "5"))
# How often the list of connected workers (connected.json) is refreshed.
TICK = min(2.0, INTERVAL)

# dask's Adaptive waits this many intervals before it scales down.
WAIT_COUNT = 3
JOB_NAME = f"dask-worker-{NAME}"


def log(msg):
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{ts} dask-spank[keeper]: {msg}", flush=True)


def read_json(name, default):
    try:
        with open(os.path.join(DIR, name), "rb") as f:
            return json.loads(f.read(65536))
    except (OSError, ValueError):
        return default


def write_json(name, value):
    path = os.path.join(DIR, name)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def seconds(t):
    """A Slurm duration ([d-]hh:mm:ss, mm:ss), or None (UNLIMITED)."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", t.strip())
    if not m:
        return None
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def lifetime(limit):
    """Seconds a worker lives before the agent retires it (dask_cmd::lifetime:
    a margin before the walltime, half the walltime for short jobs)."""
    if limit is None:
        return None
    return limit - MARGIN if limit > 2 * MARGIN else limit // 2


def successor_due(job):
    """Is it time to submit this running worker's successor? LEAD seconds
    before it retires, but never in its first half-life: a successor due at
    its own start would be succeeded at once, and so on, a chain of jobs
    where one replacement was wanted."""
    life = lifetime(job["limit"])
    if life is None:
        return False
    return life - job["used"] < min(LEAD, life / 2)


def clean_env():
    """The scheduler job's environment minus what describes that job (the
    user's own DASK_SPANK_HOME stays: the workers must find the cluster)."""
    return {k: v for k, v in os.environ.items()
            if not ((k.startswith("DASK_SPANK_") and k != "DASK_SPANK_HOME")
                    or (k.startswith("SLURM_") and k != "SLURM_CONF"))}


def worker_jobs():
    out = subprocess.run(["squeue", "-h", "-r", "-u", os.environ.get("USER", ""), "-n", JOB_NAME,
                          "-o", "%i|%T|%l|%M"], capture_output=True, text=True, env=clean_env(), timeout=60)
    jobs = []
    for line in out.stdout.splitlines():
        f = line.split("|")
        if len(f) == 4:
            jobs.append({"label": f[0], "state": f[1], "limit": seconds(f[2]), "used": seconds(f[3]) or 0})
    return jobs


def submit(k, why):
    args = read_json("worker-args.json", {}).get("args") or ["--dask-role=worker", f"--dask-cluster={NAME}"]
    args = [a for a in args if not a.startswith("--array")]
    p = subprocess.run(["sbatch", "--parsable", *args, f"--array=1-{k}"], capture_output=True, text=True,
                       env=clean_env(), timeout=120)
    if p.returncode != 0:
        err = " ".join(l for l in p.stderr.splitlines() if l.strip())
        raise RuntimeError(err or f"sbatch failed ({p.returncode})")
    log(f"submitted {k} worker job{'s' if k > 1 else ''} (array {p.stdout.strip()}): {why}")


class Scheduler:
    """The keeper's client of its own scheduler (TLS credentials of the
    cluster where it has them)."""

    def __init__(self):
        self.client = None

    def get(self):
        if self.client is not None:
            return self.client
        from distributed import Client
        from distributed.security import Security
        patch_distributed()  # defined before this file: python/dask_spank/tls_eof.py
        info = read_json("scheduler.json", {})
        if not info.get("address"):
            return None
        ca, cert, key = (os.path.join(DIR, f) for f in ("ca.pem", "tls.pem", "tls.key"))
        sec = (Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
               if os.path.exists(cert) else Security())
        self.client = Client(info["address"], security=sec, timeout=10, name="dask-spank-keeper")
        return self.client

    def workers(self):
        """dask worker name -> (address, number of keys it holds)."""
        c = self.get()
        if c is None:
            return {}
        info = c.scheduler_info(n_workers=-1)["workers"]
        return {w.get("name"): (a, w.get("metrics", {}).get("task_counts", {}).get("memory", 0))
                for a, w in info.items()}

    def adaptive_target(self):
        c = self.get()
        return c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.adaptive_target()) if c else 0


class Keeper:
    def __init__(self):
        self.sched = Scheduler()
        self.low = 0  # consecutive intervals the adaptive target was lower
        self.backoff, self.retry_at, self.short = 10.0, 0.0, None
        self.decision = None
        self.connected = {}

    def list_connected(self):
        """Record the workers connected to the scheduler (connected.json);
        an empty list until the scheduler is up."""
        self.connected = self.sched.workers()
        write_json("connected.json", {"workers": sorted(n for n in self.connected if isinstance(n, str)),
                                      "updated": int(time.time())})

    def want(self, target, active, pending_pending):
        if "adapt" in target:
            lo, hi = target["adapt"]
            want = max(lo, min(hi, int(self.sched.adaptive_target())))
            # Scale down only once the lower target held WAIT_COUNT intervals.
            if want < active:
                self.low += 1
                return want if self.low >= WAIT_COUNT else active
            self.low = 0
            return want
        return int(target.get("workers", active))

    def shrink(self, jobs, extra):
        """Cancel `extra` worker jobs: pending ones first, then the running
        ones whose workers hold the least data, retired by dask first."""
        pending = [j["label"] for j in jobs if j["state"] == "PENDING"][:extra]
        victims = pending
        if len(victims) < extra:
            workers = self.sched.workers()
            running = [j for j in jobs if j["state"] == "RUNNING"]
            running.sort(key=lambda j: workers.get(f"{NAME}-{j['label']}", (None, 0))[1])
            retire = running[:extra - len(victims)]
            addrs = [workers[f"{NAME}-{j['label']}"][0] for j in retire if f"{NAME}-{j['label']}" in workers]
            if addrs:
                self.sched.get().retire_workers(workers=addrs, close_workers=True)
            victims += [j["label"] for j in retire]
        if victims:
            subprocess.run(["scancel", *victims], capture_output=True, env=clean_env(), timeout=60)
            log(f"cancelled {len(victims)} worker job{'s' if len(victims) > 1 else ''} ({' '.join(victims)}): more than the target")

    def grow(self, k, why):
        """Submit k worker jobs. Slurm refuses a whole array that would
        pass a queue limit (MaxSubmitJobs counts its tasks), so a refused
        batch is tried again at half its size, down to one job; what was
        still refused is reported (status) and retried with a backoff."""
        n, got, err = k, 0, None
        while n > 0:
            try:
                submit(n, why)
                got = n
                break
            except Exception as e:  # noqa: BLE001 - any refusal is reported and retried
                err, n = e, n // 2
        if got == k:
            self.backoff, self.short = 10.0, None
            return
        self.short = f"sbatch refused {k - got} of {k} worker jobs: {err}"
        self.retry_at = time.time() + self.backoff
        log(f"{self.short}; retrying in {self.backoff:.0f}s")
        # A partial success means the limit moves: try again soon.
        self.backoff = 10.0 if got else min(self.backoff * 2, 300.0)

    @staticmethod
    def stale(name):
        try:
            return os.path.getmtime(os.path.join(DIR, name)) < STARTED
        except OSError:
            return True

    def step(self):
        target = read_json("target.json", None)
        if target and target.get("down"):
            # Only a `down` of this scheduler job's cluster stops it; a
            # marker from before it started is a past cluster's (a down
            # that did not finish clearing): no target then.
            return not self.stale("target.json")
        if not target:
            return False
        jobs = worker_jobs()
        waiting = [j for j in jobs if j["state"] in ("PENDING", "CONFIGURING")]
        running = [j for j in jobs if j["state"] == "RUNNING"]
        retiring = [j for j in running if successor_due(j)]
        active = len(waiting) + len(running) - len(retiring)
        want = self.want(target, active, len(waiting))
        status = {"target": want, "intention": target, "pending": len(waiting), "running": len(running),
                  "retiring": len(retiring), "connected": len(self.connected), "updated": int(time.time())}
        if want > active and time.time() >= self.retry_at:
            why = f"target {want}, {active} active" + (f" ({len(retiring)} retiring for their walltime)" if retiring else "")
            self.grow(want - active, why)
        elif want < active:
            self.shrink(jobs, active - want)
        status["short_reason"] = self.short
        write_json("keeper.json", status)
        return False


def main():
    log(f"keeping cluster {NAME} (successors {LEAD}s ahead of a worker's retirement)")
    k = Keeper()
    next_step = 0.0
    while True:
        try:
            # The connected workers, often (status, wait's progress); the
            # decisions, which ask Slurm, every INTERVAL.
            k.list_connected()
            if time.time() >= next_step:
                next_step = time.time() + INTERVAL
                if k.step():
                    log("the cluster is going down: keeping no more")
                    return
        except Exception as e:  # noqa: BLE001 - the keeper must outlive a bad interval
            log(f"keeping failed this time: {type(e).__name__}: {e}")
            k.sched.client = None
        time.sleep(TICK)


main()
