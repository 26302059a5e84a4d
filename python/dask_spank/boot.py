"""The node agent's boot code for the dask processes it starts, after
tls_eof.py (whose patch_distributed it calls): the agent hands both, as
one program, to the job's own Python (``python3 -c BOOT dask-worker ARGS``;
the fork server runs them before forking its workers), which need not have
dask_spank installed. Standard library only, and distributed.

It makes the process's HTTP server (the dashboard, and a worker's own:
status pages, logs, exceptions, call stacks, metrics) private to the
cluster's owner: every request must carry the cluster's dashboard token
(the file the agent names in DASK_SPANK_DASHBOARD_TOKEN_FILE, 0600, which
only the owner can read), as `?token=` (then a cookie is set and the
browser sent on to the same URL without it), as that cookie, or as the
path's prefix `/dask-spank-token/TOKEN/` (for proxies: the rest of the
path is served). Anybody else gets 403 and nothing of the cluster.

It makes the scheduler's idle timeout mean what the site's policy says: no
task and no client (but the cluster's own: its keeper's helper) for that
long. dask's own ignores clients, so a user who persisted data and stepped
away lost it with the cluster. And it adds the site's no-client timeout: no
client (tasks or not) for that long, and the scheduler closes.

And it marks a worker's exit for a restart in place: ``client.restart()`` has
the scheduler remove every worker, and a worker without a Nanny (the node
agent is its nanny) then just exits 0, which the agent would take as the
end of the job. A running worker that the scheduler removes exits with
RESTART_EXIT instead, and the agent starts it again at once, in its job. A
retiring worker (its status is closing_gracefully: its data moved, its job
is over) or one the scheduler closes at its own end still exits 0. A worker
that never started (distributed closes it with a ``failure-to-start-...``
reason: it gave up reaching its scheduler within its death timeout, or
failed starting) exits with STARTUP_FAILED_EXIT, and the agent starts it
again after a growing delay, not at once: on a node or a scheduler too busy
to start it, an immediate restart is one more Python start on the busy
cores, for every worker of an array at once.

And it makes a worker wait for its scheduler file however long it takes
(unless the cluster's scheduler has come and gone: wait_or_leave):
Slurm starts a cluster's jobs in any order (a busy partition can hold the
scheduler job for hours), and distributed's worker gives up on the file
after its death timeout, a crash that the agent restarts at once, until
worker_restart_max ends the job. The wait comes after the imports (the
slow part of a start, done while the scheduler starts), those that
distributed would make inside the worker's timed start included (its HTTP
routes, the dashboard's bokeh pages: import_timed_start), and before the
worker reads the cluster's TLS credentials, which the scheduler job makes
before its scheduler writes the file. The death timeout then counts from
the file, for reaching and joining the scheduler.

And it runs a pool's own worker class (WORKER_CLASS_ENV), once it has
checked that the job's Python can import it.
"""

#: The exit code of a worker its scheduler removed while it ran: the node
#: agent restarts it in place (node-agent/src/spawning/dask_cmd.rs, RESTART_EXIT).
RESTART_EXIT = 75
#: The exit code of a worker that failed to start: the node agent restarts
#: it after a growing delay (node-agent/src/spawning/dask_cmd.rs, STARTUP_FAILED_EXIT).
STARTUP_FAILED_EXIT = 76
#: The cluster's state record, beside its scheduler file (common/src/paths.rs,
#: layout::STATE_FILE): the scheduler job's attach writes it while the
#: scheduler file exists, and a new scheduler job removes it at its start.
STATE_FILE = "state.json"
#: The short names the node agent starts dask by (`ps` shows them).
COMMANDS = {"dask-scheduler": "distributed.cli.dask_scheduler", "dask-worker": "distributed.cli.dask_worker"}
#: The path prefix that carries the dashboard token (python/dask_spank/cluster.py
#: builds links with it): /dask-spank-token/TOKEN/status is /status.
PATH_TOKEN = "/dask-spank-token/"
#: How long a worker polls for its scheduler file every 0.1 s (wait_or_leave).
FAST_POLL_S = 10.0
_removed_while_running = []
_failed_to_start = []


def protect_dashboard():
    """Refuse every HTTP request of this process without the cluster's
    dashboard token (fail closed: no token file, no answer)."""
    import hashlib
    import hmac
    import os

    path = os.environ.pop("DASK_SPANK_DASHBOARD_TOKEN_FILE", None)
    try:
        from distributed.http.routing import RoutingApplication
        from tornado import web
    except ImportError:
        return
    if path is None or getattr(RoutingApplication.find_handler, "_dask_spank_private", False):
        return
    known = []

    def token():
        if not known:
            try:
                with open(path) as f:
                    t = f.read(256).strip()
            except OSError:
                return None
            if t:
                known.append((t, "dask_spank_" + hashlib.sha256(t.encode()).hexdigest()[:12]))
        return known[0] if known else None

    class Forbidden(web.RequestHandler):
        def prepare(self):
            self.set_status(403)
            self.set_header("Content-Type", "text/plain")
            self.finish("403: this dask dashboard is private to its owner (dask-spank)\n")

    class Welcome(web.RequestHandler):
        """A valid ?token=: the cookie, and the same URL without it."""

        def prepare(self):
            from urllib.parse import urlencode

            t, cookie = token()
            # A session cookie no longer than a day: it names this cluster
            # (the token's hash), so two clusters on one host do not collide.
            self.set_cookie(cookie, t, httponly=True, samesite="Strict", max_age=86400)
            rest = {k: v for k, v in self.request.query_arguments.items() if k != "token"}
            query = urlencode([(k, x.decode()) for k, vs in rest.items() for x in vs])
            self.redirect(self.request.path + ("?" + query if query else ""))

    find = RoutingApplication.find_handler

    def find_private(self, request, **kwargs):
        known_token = token()
        if known_token is not None:
            t, cookie = known_token
            # The token as the path's first two segments
            # (/dask-spank-token/TOKEN/status): the page is served as
            # /status, and the pages and plots it links to relatively keep
            # the prefix. What a proxy needs (jupyter-server-proxy, the
            # JupyterLab Dask panel), whose paths are joined to the link and
            # whose cookies are its own.
            if request.path.startswith(PATH_TOKEN):
                given, _, rest = request.path[len(PATH_TOKEN):].partition("/")
                if given and hmac.compare_digest(given.encode(errors="replace"), t.encode()):
                    request.path = "/" + rest
                    request.uri = request.path + ("?" + request.query if request.query else "")
                    return find(self, request, **kwargs)
                return self.get_handler_delegate(request, Forbidden)
            # Bytes, not str: compare_digest refuses a str that is not ASCII.
            given = request.query_arguments.get("token", [b""])[0]
            if given and hmac.compare_digest(given, t.encode()):
                return self.get_handler_delegate(request, Welcome)
            jar = request.cookies.get(cookie)
            if jar is not None and hmac.compare_digest(jar.value.encode(errors="replace"), t.encode()):
                return find(self, request, **kwargs)
        return self.get_handler_delegate(request, Forbidden)

    find_private._dask_spank_private = True
    RoutingApplication.find_handler = find_private


#: The name the keeper's helper gives its Client (runtime/keeper/helper.py):
#: its client id is "Client-<name>-<uuid>".
KEEPER_CLIENT = "dask-spank-keeper"


def idle_counts_clients():
    """A scheduler with a client connected (other than the cluster's own)
    is not idle, however long no task runs. And with the site's
    no_client_timeout (DASK_SPANK_NO_CLIENT_TIMEOUT, seconds), a scheduler
    that no client used for that long closes, tasks or not."""
    import os
    import sys
    import time

    try:
        no_client_s = float(os.environ.pop("DASK_SPANK_NO_CLIENT_TIMEOUT", "0"))
    except ValueError:
        no_client_s = 0.0
    try:
        from distributed.scheduler import Scheduler
    except ImportError:
        return
    check = Scheduler.check_idle
    if getattr(check, "_dask_spank_clients", False):
        return

    def check_idle(self):
        users = [c for c in self.clients if c != "fire-and-forget" and f"-{KEEPER_CLIENT}-" not in c]
        now = time.monotonic()
        if users or not hasattr(self, "_dask_spank_last_client"):
            # From the start too: a cluster nobody connects to also ends.
            self._dask_spank_last_client = now
        if no_client_s and now - self._dask_spank_last_client > no_client_s \
                and not getattr(self, "_dask_spank_closing", False):
            self._dask_spank_closing = True
            print(f"dask-spank: no client for {no_client_s:.0f}s (the site's no_client_timeout): "
                  f"the scheduler closes, and its workers with it", file=sys.stderr, flush=True)
            self._ongoing_background_tasks.call_soon(self.close, reason="no-client-timeout-exceeded")
            return None
        if users:
            self.idle_since = None
            return None
        return check(self)

    check_idle._dask_spank_clients = True
    Scheduler.check_idle = check_idle


def mark_restarts():
    """Remember when the scheduler removes this worker while it runs (the
    scheduler's restart of workers without a Nanny), and when the worker
    closes because it failed to start (distributed's Server.start gives
    that reason for a start that timed out or raised)."""
    try:
        from distributed import Worker
        from distributed.core import Status
    except ImportError:
        return
    close = Worker.close
    if getattr(close, "_dask_spank_restart", False):
        return

    async def close_marking_restarts(self, *args, reason="worker-close", **kwargs):
        # A paused worker (memory over its pause threshold) is running too:
        # client.restart() is how a user frees it.
        if reason == "scheduler-remove-worker" and self.status in (Status.running, Status.paused):
            _removed_while_running.append(reason)
        elif str(reason).startswith("failure-to-start"):
            _failed_to_start.append(reason)
        return await close(self, *args, reason=reason, **kwargs)

    close_marking_restarts._dask_spank_restart = True
    Worker.close = close_marking_restarts


def wait_for_scheduler_file():
    """A worker waits for its scheduler file (``--scheduler-file``) as long
    as it takes, before anything of the worker is made (its TLS context,
    from the cluster's credentials, comes first), and says once in the
    job's log that it waits. distributed's own waits for its death timeout
    only."""
    try:
        from distributed import Worker
    except ImportError:
        return
    init = Worker.__init__
    if getattr(init, "_dask_spank_wait", False):
        return

    def init_waiting(self, *args, scheduler_file=None, **kwargs):
        import_timed_start(dashboard=kwargs.get("dashboard", False))
        if scheduler_file:
            wait_or_leave(scheduler_file, kwargs.get("death_timeout"))
        init(self, *args, scheduler_file=scheduler_file, **kwargs)

    init_waiting._dask_spank_wait = True
    Worker.__init__ = init_waiting


def wait_or_leave(scheduler_file, death_timeout):
    """Wait until the scheduler file is there and reads as JSON (distributed
    writes it in place, so a reader can see it half written), saying once
    in the job's log that it waits, unless the cluster's scheduler has come
    and gone: its state record is there and its file is not (distributed
    removes the file when the scheduler closes; a new scheduler job removes
    the record first). Then, after the death timeout (time for a new
    scheduler job of the cluster to begin), the worker leaves with exit
    code 0, as a worker whose scheduler is gone does: its job ends,
    COMPLETED, and nobody is left waiting for a scheduler that will not
    come (a scheduler job whose keeper was killed cancels no worker job).
    A file that stays unreadable for the death timeout is named in the log
    once, and waited for: only its scheduler job writes it."""
    import json
    import os
    import sys
    import time

    try:
        from dask.utils import parse_timedelta

        grace = parse_timedelta(death_timeout) if death_timeout else 60.0
    except Exception:
        grace = 60.0

    def say(message):
        print(f"dask-spank: {message}", file=sys.stderr, flush=True)

    state = os.path.join(os.path.dirname(scheduler_file), STATE_FILE)
    gone_since = unreadable_since = None
    started = time.monotonic()
    said_waiting = said_unreadable = False
    while True:
        try:
            with open(scheduler_file) as f:
                json.load(f)
            return
        except FileNotFoundError:
            unreadable_since = None
            if not said_waiting:
                say(f"waiting for the scheduler file {scheduler_file}: the cluster's scheduler job writes it "
                    f"once its scheduler is up")
                said_waiting = True
            if os.path.exists(state):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > grace:
                    say(f"the cluster's scheduler has stopped (its state record {state} is there, its "
                        f"scheduler file is not, for {grace:.0f}s): this worker leaves")
                    raise SystemExit(0)
            else:
                gone_since = None
        except (OSError, ValueError) as e:
            # Half written, or not JSON: wait for the scheduler job to write it.
            gone_since = None
            unreadable_since = unreadable_since or time.monotonic()
            if not said_unreadable and time.monotonic() - unreadable_since > grace:
                say(f"the scheduler file {scheduler_file} has not been readable JSON for {grace:.0f}s "
                    f"({e}): waiting for the cluster's scheduler job to write it again")
                said_unreadable = True
        # Every 0.1 s for the first FAST_POLL_S, then every 0.5 s: a
        # cluster's jobs usually start together, and the scheduler's file
        # then comes a second or two after the worker began waiting, on the
        # cluster's critical path (a 0.5 s poll added 0.25 s on average to
        # every start); a worker still waiting after that waits for a
        # scheduler job Slurm has not started, and a slower poll spares the
        # users' home file system (an open of a missing file each time).
        time.sleep(0.1 if time.monotonic() - started < FAST_POLL_S else 0.5)


def import_timed_start(dashboard=True):
    """Import now what distributed imports inside a worker's timed start:
    its HTTP routes and, with its dashboard, bokeh's pages (a third of a
    second of CPU, half of a worker's start after the imports: 0.33 s of
    CPU inside the death timeout, 0.02 s once imported here). On a node
    with 128 starting workers per core, that third of a second is most of a
    60 s death timeout, which then runs out before the worker has tried its
    scheduler, and every failed start is one more Python start on the same
    cores. Done before the wait for the scheduler file (beside the
    scheduler's start), and once in the fork server (shared by its forks).
    A module that fails to import is left for distributed's start to
    report, as it would."""
    import importlib

    try:
        import dask

        modules = list(dask.config.get("distributed.worker.http.routes", []))
    except Exception:
        return
    if dashboard:
        modules.append("distributed.dashboard.worker")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:
            pass


def exit_code(code):
    """The process's exit code: RESTART_EXIT for a clean exit after the
    scheduler removed the running worker, STARTUP_FAILED_EXIT for a failed
    exit of a worker that never started, else `code`."""
    if code in (0, None):
        return RESTART_EXIT if _removed_while_running else code
    return STARTUP_FAILED_EXIT if _failed_to_start else code


def say_python(what):
    """Say in the job's log which Python runs (the environment's)."""
    import sys

    print(f"dask-spank: {what} runs {sys.executable} (Python {sys.version.split()[0]})", file=sys.stderr,
          flush=True)


#: The worker class of a pool (``worker_class=`` of ``up --pool``): a
#: subclass of distributed.Worker, imported by the job's own Python.
WORKER_CLASS_ENV = "DASK_SPANK_WORKER_CLASS"


def worker_class_args():
    """``--worker-class CLASS`` for dask-worker when the job's environment
    names one, after checking, in one line of the job's log, that the job's
    Python can import it and that it is a Worker (the node agent is the
    nanny: a Nanny class, or dask_cuda's CUDAWorker, which starts nannies of
    its own, cannot stand in for the worker)."""
    import importlib
    import os
    import re
    import sys

    name = os.environ.get(WORKER_CLASS_ENV, "")
    if not name:
        return []

    def fail(why):
        print(f"dask-spank: worker class {name!r} ({WORKER_CLASS_ENV}): {why}", file=sys.stderr, flush=True)
        raise SystemExit(2)

    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", name):
        fail("must be a dotted Python name, MODULE.CLASS, e.g. mypackage.MyWorker")
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        fail(f"{sys.executable} cannot import it: {type(e).__name__}: {e}")
    from distributed import Worker

    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        fail("is not a subclass of distributed.Worker (the node agent is the worker's nanny)")
    return ["--worker-class", name]


def run_module():
    """Entry point of the boot (`python -c BOOT dask-worker ARGS...`):
    patch distributed, then run the command's module
    (distributed.cli.dask_worker) exactly as `python -m` does, its errors
    (a missing distributed) included."""
    import os
    import runpy
    import sys

    patch_distributed()  # noqa: F821 - defined before this file: tls_eof.py
    protect_dashboard()
    mark_restarts()
    idle_counts_clients()
    wait_for_scheduler_file()
    name = sys.argv.pop(1)
    # The agent passes the scheduler file in the environment (a short
    # command line for ps, whatever the path): back among the arguments.
    scheduler_file = os.environ.pop("DASK_SPANK_SCHEDULER_FILE", None)
    if scheduler_file:
        sys.argv[1:1] = ["--scheduler-file", scheduler_file]
    say_python(name)
    if name == "dask-worker":
        sys.argv[1:1] = worker_class_args()
    try:
        runpy._run_module_as_main(COMMANDS.get(name, name), alter_argv=True)
    except SystemExit as e:
        raise SystemExit(exit_code(e.code)) from None
    sys.exit(exit_code(0))
