"""SpankCluster: a dask-spank cluster as a ``distributed.deploy.Cluster``.

The cluster's jobs are the site's business (sbatch, through the
``dask-spank`` command, so the site policy applies as to any submission);
this class records intentions through that command (``up``, ``scale``,
``down``) and talks to the scheduler with the cluster's TLS credentials.
Where the files are comes from the command too (``dask-spank layout``): one
definition of the cluster directory, in the Rust code.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import html
import subprocess
import threading
import time
import weakref
from pathlib import Path

from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster
from distributed.security import Security

from .tls_eof import clear_before_tls_io, ignore_unexpected_eof

logger = logging.getLogger("dask_spank")

#: Largest scheduler file read (dask writes a few hundred bytes).
MAX_SCHEDULER_FILE = 64 * 1024
#: distributed's own dashboard link (distributed.dashboard.link): the
#: scheduler's HTTP server itself, not a proxy in front of it.
DIRECT_LINK = "{scheme}://{host}:{port}/status"
#: The dashboard token as a path prefix (python/dask_spank/boot.py).
PATH_TOKEN = "/dask-spank-token/"


class DaskSpankError(RuntimeError):
    """A dask-spank command failed; the message is its own."""


def _cli(*args: str) -> str:
    exe = shutil.which(os.environ.get("DASK_SPANK_CLI", "dask-spank"))
    if exe is None:
        raise DaskSpankError("the dask-spank command is not on PATH (install the site's dask-spank package)")
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise DaskSpankError(p.stderr.strip() or f"dask-spank {' '.join(args)} failed ({p.returncode})")
    return p.stdout


def layout(name: str) -> dict[str, str]:
    """The paths of cluster ``name``'s files (``dask-spank layout``)."""
    return json.loads(_cli("layout", name))


def _read_small(path: str) -> bytes | None:
    """A small regular file, or None (missing, not a file, too large)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > MAX_SCHEDULER_FILE:
            return None
        return os.read(fd, MAX_SCHEDULER_FILE + 1)[:MAX_SCHEDULER_FILE]
    finally:
        os.close(fd)


def _address(paths: dict[str, str]) -> str | None:
    text = _read_small(paths["scheduler_file"])
    try:
        return json.loads(text)["address"] if text else None
    except (ValueError, KeyError, TypeError):
        return None


def security(name_or_paths: str | dict[str, str]) -> Security:
    """The ``Security`` that lets this user's processes into the cluster:
    its TLS credentials where it has them, plain TCP otherwise (a site
    with ``tls=off``)."""
    paths = layout(name_or_paths) if isinstance(name_or_paths, str) else name_or_paths
    if all(Path(paths[k]).is_file() for k in ("tls_ca", "tls_cert", "tls_key")):
        return ClusterSecurity(tls_ca_file=paths["tls_ca"], tls_client_cert=paths["tls_cert"],
                               tls_client_key=paths["tls_key"], require_encryption=True)
    return Security()


class ClusterSecurity(Security):
    """dask's ``Security``, whose TLS contexts take a peer that leaves
    without a close_notify as a clean end of stream: otherwise, under
    Python 3.14, one dead connection can close the client's healthy one
    (see :mod:`dask_spank.tls_eof`)."""

    # No __slots__ of its own: Security checks its arguments against
    # self.__slots__, which must stay the base class's.

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        clear_before_tls_io()

    def _get_tls_context(self, tls, purpose):
        return ignore_unexpected_eof(super()._get_tls_context(tls, purpose))


def security_loader(info: dict) -> Security | None:
    """For ``distributed.client.security-loader``: the credentials of the
    user's cluster whose scheduler is at ``info["address"]``, so that a
    plain ``Client("tls://...")`` works (distributed calls it only for an
    address: not for ``Client(scheduler_file=...)``)."""
    for _, paths in sorted(json.loads(_cli("layout"))["clusters"].items()):
        if _address(paths) == info.get("address"):
            return security(paths)
    return None


#: The options of a start that take one value, their `dask-spank up` flags
#: (their keys are also those of dask's configuration: personal defaults,
#: see `_defaults`).
SIZING = (("worker_mem", "--worker-mem"), ("worker_cpus", "--worker-cpus"), ("worker_time", "--worker-time"),
          ("scheduler_mem", "--scheduler-mem"), ("account", "--account"), ("qos", "--qos"),
          ("partition", "--worker-partition"), ("scheduler_partition", "--scheduler-partition"),
          ("constraint", "--constraint"), ("gres", "--gres"), ("local_directory", "--worker-local-directory"))
#: The options that take several: flag, and how each item becomes its value.
MANY = (("env_vars", "--export", lambda kv: f"{kv[0]}={kv[1]}"),
        ("resources", "--worker-resources", lambda kv: f"{kv[0]}={kv[1]}"),
        ("preload", "--worker-preload", str), ("worker_sbatch", "--worker-sbatch", str),
        ("scheduler_sbatch", "--scheduler-sbatch", str))
#: A pool's keys (``pools={"gpu": dict(workers=2, gres="gpu:1", resources={"GPU": 1})}``),
#: as ``dask-spank up --pool NAME:KEY=VALUE,...`` takes them.
POOL_KEYS = ("workers", "adapt", "gres", "resources", "partition", "mem", "cpus", "time", "constraint", "sbatch",
             "worker_class")


def pool_arg(name: str, spec: dict) -> str:
    """One pool as ``up --pool`` takes it; a bad key or a value that would
    not survive the command line is a ValueError naming it."""
    unknown = sorted(set(spec) - set(POOL_KEYS))
    if unknown:
        raise ValueError(f"pools[{name!r}]: unknown key(s) {unknown} (keys: {', '.join(POOL_KEYS)})")
    items = []
    for key in POOL_KEYS:
        value = spec.get(key)
        if value is None:
            continue
        if key == "adapt":
            lo, hi = value
            value = [f"{int(lo)}:{int(hi)}"]
        elif key == "resources":
            value = [f"{r}={a}" for r, a in dict(value).items()]
        elif key == "sbatch":
            value = [value] if isinstance(value, str) else list(value)
        else:
            value = [value]
        for v in value:
            if "," in str(v):
                raise ValueError(f"pools[{name!r}][{key!r}]={v!r}: a value of a pool may not hold a comma")
            items.append(f"{key}={v}")
    return f"{name}:{','.join(items)}"


def _defaults() -> dict:
    """Personal defaults from dask's configuration: a ``dask-spank:``
    section in ``~/.config/dask/*.yaml``, or ``DASK_DASK_SPANK__WORKER_MEM``
    and the like (see docs/user.md)."""
    import dask

    conf = dask.config.get("dask-spank", default={}) or {}
    return {k.replace("-", "_"): v for k, v in conf.items()}


def own_env() -> str | None:
    """This Python's environment, for the workers (``--dask-env``): its
    prefix, if ``<prefix>/bin/python`` is this very interpreter (a venv or
    a conda env; not a system Python, whose prefix is /usr)."""
    import sys

    candidate = Path(sys.prefix) / "bin" / "python"
    try:
        same = candidate.resolve(strict=True) == Path(sys.executable).resolve(strict=True)
    except OSError:
        return None
    return sys.prefix if same and sys.prefix != "/usr" else None


def fresh_name(prefix: str | None = None) -> str:
    """A cluster name of this user's not in use: ``PREFIX-N``, the first N
    with no cluster directory (``dask-spank layout``) and no job (``dask-spank
    ls``). The prefix is ``dask-spank.name-prefix`` of dask's configuration
    (default ``dask``)."""
    import dask

    prefix = prefix or dask.config.get("dask-spank.name-prefix", default=None) or "dask"
    taken = set(json.loads(_cli("layout"))["clusters"])
    taken.update(c["cluster"] for c in json.loads(_cli("ls", "--json")))
    n = 1
    while f"{prefix}-{n}" in taken:
        n += 1
    return f"{prefix}-{n}"


class Adaptation:
    """What `SpankCluster.adapt` returns: the bounds, and for an
    asynchronous cluster the command's completion to await."""

    def __init__(self, minimum: int, maximum: int, done: asyncio.Future | None = None):
        self.minimum, self.maximum, self._done = minimum, maximum, done

    def __await__(self):
        async def _():
            if self._done is not None:
                await self._done
            return self

        return _().__await__()

    def __repr__(self):
        return f"<dask-spank adaptive: {self.minimum} to {self.maximum} worker jobs, in the scheduler job>"


class SpankCluster(Cluster):
    """A dask-spank cluster.

    ``SpankCluster("ana")`` attaches to a running cluster;
    ``SpankCluster("ana", workers=20, worker_mem="3G")`` starts one (``dask-spank
    up``: the site's policy applies) and, by default, stops it on
    ``close()``; ``SpankCluster(workers=20)`` starts one under a fresh name
    (`fresh_name`: what JupyterLab's Dask panel creates).
    ``pools={"gpu": dict(workers=2, gres="gpu:1", resources={"GPU": 1})}``
    adds pools of other workers (``dask-spank up --pool``; keys: workers,
    adapt=(MIN, MAX), gres, resources, partition, mem, cpus, time,
    constraint, sbatch): tasks submitted with ``resources={"GPU": 1}`` run
    there only; ``scale(n, pool="gpu")`` and ``adapt(0, 8, pool="gpu")``
    size one. Its workers run
    this Python's environment unless ``env`` says otherwise (``env=False``:
    the job's ``python3``).

    It works in a notebook's event loop: ``await SpankCluster(...,
    asynchronous=True)`` and ``async with`` never block the loop.
    """

    #: The open clusters of this process (dask_spank.jupyter lists the
    #: others of the user's).
    _open: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, name: str | None = None, *, workers: int | None = None, worker_mem: str | None = None,
                 worker_cpus: int | None = None, worker_time: str | None = None,
                 scheduler_mem: str | None = None, env: str | bool | None = None,
                 account: str | None = None, qos: str | None = None, partition: str | None = None,
                 scheduler_partition: str | None = None, constraint: str | None = None, gres: str | None = None,
                 env_vars: dict | None = None, resources: dict | None = None, local_directory: str | None = None,
                 preload: list | None = None, worker_sbatch: list | None = None,
                 scheduler_sbatch: list | None = None, pools: dict | None = None, wait: float | None = None,
                 reuse: bool = False, timeout: float = 600, shutdown_on_close: bool | None = None,
                 asynchronous: bool = False, loop=None, quiet: bool = True):
        given = {"worker_mem": worker_mem, "worker_cpus": worker_cpus, "worker_time": worker_time,
                 "scheduler_mem": scheduler_mem, "account": account, "qos": qos, "partition": partition,
                 "scheduler_partition": scheduler_partition, "constraint": constraint, "gres": gres,
                 "env_vars": env_vars, "resources": resources, "local_directory": local_directory,
                 "preload": preload, "worker_sbatch": worker_sbatch, "scheduler_sbatch": scheduler_sbatch,
                 "pools": pools}
        if workers is None:
            if name is None:
                raise TypeError("SpankCluster() needs the name of a running cluster to attach to, "
                                "or workers=N to start a new one")
            extra = sorted(k for k, v in given.items() if v is not None)
            if extra or env not in (None, False):
                raise TypeError(f"SpankCluster({name!r}) attaches to a running cluster: {', '.join(extra or ['env'])} "
                                f"size(s) a new one; pass workers=N to start it")
        sizing = {**{k: v for k, v in _defaults().items() if k in given}, **{k: v for k, v in given.items() if v is not None}}
        if env is None:
            env = _defaults().get("env") or own_env()
        self._start_with = None if workers is None else {"workers": workers, "env": env or None, **sizing}
        self._wait, self._reuse, self._timeout = wait, reuse, timeout
        self.paths = {}
        self._started_here = False
        # Per-pool counts for the widget (`_pool_counts`).
        self._pools_seen, self._pools_at, self._pools_busy = {}, float("-inf"), False
        self.shutdown_on_close = workers is not None if shutdown_on_close is None else shutdown_on_close
        # A name is chosen at the start (it asks the command: off the loop).
        self._fresh = name is None
        super().__init__(asynchronous=asynchronous, loop=loop, name=name, quiet=quiet)
        SpankCluster._open.add(self)
        if not self.asynchronous and not self.called_from_running_loop:
            self._loop_runner.start()
            try:
                self.sync(self._start)
            except BaseException:
                self.status = Status.closed
                self._loop_runner.stop()
                raise

    def __await__(self):
        async def _():
            if self.status == Status.created:
                await self._start()
            return self

        return _().__await__()

    async def _cli(self, *args: str) -> str:
        """The command, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, _cli, *args)

    def _up_args(self) -> list[str]:
        """The ``dask-spank up`` command line of this cluster's start."""
        s = self._start_with or {"workers": 1}
        args = ["up", self.name, "--workers", str(s["workers"])]
        for key, flag in SIZING:
            if s.get(key) is not None:
                args += [flag, str(s[key])]
        for key, flag, item in MANY:
            values = s.get(key) or []
            for v in (values.items() if isinstance(values, dict) else values):
                args.append(f"{flag}={item(v)}")
        for pool, spec in (s.get("pools") or {}).items():
            args += ["--pool", pool_arg(pool, spec)]
        if s.get("env"):
            args += ["--env", str(s["env"])]
        return args

    def job_script(self) -> str:
        """The sbatch command lines of the cluster's jobs, with the site's
        defaults in, as the plugin plans them (``dask-spank up --dry-run``):
        for a cluster this object starts, its own; for one it attaches to,
        what a start with the defaults would submit."""
        plan = json.loads(_cli(*self._up_args(), "--dry-run", "--json"))
        lines = []
        for role in ("scheduler", "workers"):
            lines.append(" ".join(shlex.quote(w) for w in plan[role]["sbatch"]))
        for pool in plan.get("pools", {}).values():
            lines.append(" ".join(shlex.quote(w) for w in pool["sbatch"]))
        return "\n".join(lines) + "\n"

    async def _up(self) -> None:
        """Start the cluster (``dask-spank up``); with ``reuse``, a running
        cluster of the name is scaled instead. A fresh name that another
        process took meanwhile gives way to the next one."""
        s = self._start_with
        for _ in range(10):
            try:
                await self._cli(*self._up_args())
                self._started_here = True
                return
            except DaskSpankError as e:
                if "already in use" not in str(e):
                    raise
                if not self._fresh:
                    in_use = e
                    break
            self.name = await asyncio.get_running_loop().run_in_executor(None, fresh_name)
            self.paths = json.loads(await self._cli("layout", self.name))
        else:
            raise DaskSpankError(f"no fresh cluster name after 10 tries (the last: {self.name!r})")
        if not self._reuse:
            raise DaskSpankError(f"{in_use}; SpankCluster({self.name!r}) attaches to it, "
                                 f"SpankCluster({self.name!r}, workers=N, reuse=True) attaches and scales it")
        await self._cli("scale", self.name, str(s["workers"]))
        self.shutdown_on_close = False

    async def _wait_address(self) -> str:
        end = time.monotonic() + self._timeout
        while True:
            address = _address(self.paths)
            if address:
                return address
            if time.monotonic() > end:
                raise TimeoutError(f"cluster {self.name!r} has no scheduler after {self._timeout:.0f}s "
                                   f"(dask-spank status {self.name} and its logs say why)")
            await asyncio.sleep(0.5)

    async def _start(self):
        if self._fresh:
            self.name = await asyncio.get_running_loop().run_in_executor(None, fresh_name)
        self.paths = json.loads(await self._cli("layout", self.name))
        if self._start_with is not None:
            await self._up()
        else:
            # An unknown name fails now, not after the timeout.
            await self._cli("status", self.name, "--json")
        try:
            await self._connect()
        except BaseException as e:
            # Nothing holds a cluster whose start failed: one this object
            # submitted (and would shut down on close) goes now, rather than
            # idling until its time limit. A reused or attached one stays.
            if self._started_here and self.shutdown_on_close:
                try:
                    await self._cli("down", self.name)
                except Exception as down_error:
                    raise DaskSpankError(f"{e}; and its jobs could not be cancelled: {down_error}") from e
                if hasattr(e, "add_note"):  # Python 3.11+
                    e.add_note(f"dask-spank: cluster {self.name!r} was shut down (its jobs cancelled); "
                               f"its logs stay: dask-spank logs {self.name}")
            raise

    async def _connect(self):
        address = await self._wait_address()
        self.security = security(self.paths)
        self.scheduler_comm = rpc(address, connection_args=self.security.get_connection_args("client"))
        await super()._start()
        if self._wait is not None:
            await self._cli("wait", self.name, "--percent", str(self._wait), "--timeout", str(int(self._timeout)))

    def _do(self, *args: str):
        """Run a command: now, raising its error, for a synchronous
        cluster; off the event loop, as a task, for an asynchronous one
        (a failure nobody awaits is logged)."""
        if self.asynchronous:
            task = asyncio.ensure_future(self._cli(*args))
            task.add_done_callback(self._log_failure)
            return task
        self._log(_cli(*args).strip())
        return None

    def _log_failure(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log(f"dask-spank: {task.exception()}")
            logger.warning("cluster %r: %s", self.name, task.exception())

    def scale(self, n: int, pool: str | None = None):
        """Have ``n`` worker jobs (``dask-spank scale``), of the default pool
        or of ``pool``."""
        return self._do("scale", self.name, str(int(n)), *(["--pool", pool] if pool else []))

    def adapt(self, minimum: int = 0, maximum: int | None = None, pool: str | None = None,
              **kwargs) -> Adaptation:
        """Size the cluster with dask's adaptive target, between `minimum`
        and `maximum` worker jobs. It runs in the scheduler job (``dask-spank
        adapt``), not in this process: it goes on when the notebook ends.
        dask's other Adaptive options are not taken. What it returns has
        the bounds (as dask's Adaptive: dask-labextension shows them) and,
        for an asynchronous cluster, can be awaited. With ``pool``, that pool
        is sized instead, by the tasks that ask for its worker resources
        (``client.submit(f, resources={"GPU": 1})`` grows the pool with
        ``resources={"GPU": 1}``, and no other)."""
        if maximum is None:
            raise ValueError("adapt() needs a maximum number of worker jobs")
        if kwargs:
            raise TypeError(f"adapt() takes minimum and maximum only, not {sorted(kwargs)}")
        done = self._do("adapt", self.name, str(int(minimum)), str(int(maximum)),
                        *(["--pool", pool] if pool else []))
        return Adaptation(int(minimum), int(maximum), done)

    #: How often the widget's pool counts are read again (seconds).
    POOLS_REFRESH_S = 10

    def _pool_counts(self) -> dict:
        """Per-pool counts (``status --json``'s ``pools``), as last read. The
        widget redraws on the event loop every half second: the command
        (an squeue) runs in a thread at most every POOLS_REFRESH_S, never on
        the loop; the first read waits for it only outside a running loop."""
        if not hasattr(self, "_pools_busy") or not self.name:
            return {}
        if self._pools_busy or time.monotonic() - self._pools_at < self.POOLS_REFRESH_S:
            return self._pools_seen

        def read():
            try:
                self._pools_seen = json.loads(_cli("status", self.name, "--json")).get("pools", {})
            except Exception:  # noqa: BLE001 - a widget shows what it has
                pass
            finally:
                self._pools_at, self._pools_busy = time.monotonic(), False

        self._pools_busy = True
        t = threading.Thread(target=read, daemon=True, name="dask-spank-pools")
        t.start()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            t.join(30)
        return self._pools_seen

    def _repr_html_(self, cluster_status=None):
        """distributed's cluster view, with a line per worker pool once the
        cluster has pools other than its default one."""
        pools = self._pool_counts()
        if cluster_status is None and any(p != "default" for p in pools):
            rows = "".join(
                f"<tr><td style='text-align: left;'>Pool {html.escape(p)}: {n.get('connected', 0)} of "
                f"{n.get('total', 0)} worker jobs connected ({n.get('pending', 0)} pending, "
                f"{n.get('failed', 0)} failed)</td></tr>"
                for p, n in sorted(pools.items()))
            cluster_status = rows  # rows of distributed's table
        return super()._repr_html_(cluster_status=cluster_status)

    def dashboard_token(self) -> str | None:
        """The cluster's dashboard token (the file in its private
        directory, new for each scheduler job), or None."""
        if "dashboard_token" not in self.paths:
            return None
        try:
            with open(self.paths["dashboard_token"]) as f:
                return f.read(256).strip() or None
        except OSError:
            return None

    @property
    def dashboard_link(self) -> str:
        """The dashboard's link, with the cluster's token: the dashboard
        answers nobody without it (dask-spank makes it private).

        With distributed's own link (``distributed.dashboard.link``: the
        scheduler's server itself), the token is the query (``?token=``:
        the first visit sets a cookie and drops it from the address bar).
        With a link through a proxy (jupyter-server-proxy's
        ``{JUPYTERHUB_SERVICE_PREFIX}proxy/{host}:{port}/status``, say), it
        is the path's prefix on the dask side, ``…/{port}/dask-spank-token/TOKEN/status``:
        paths joined to the link (JupyterLab's Dask panel adds
        ``individual-plots.json`` and the plots' paths) keep it, and no
        cookie is needed on the proxy's host."""
        link = super().dashboard_link
        token = self.dashboard_token() if link else None
        if not token:
            return link
        import dask
        from distributed.utils import format_dashboard_link

        template = dask.config.get("distributed.dashboard.link")
        if template != DIRECT_LINK and "{port}" in template:
            # The host as distributed's Cluster.dashboard_link takes it.
            host = self.scheduler_address.split("://")[1].split("/")[0].split(":")[0]
            port = self.scheduler_info["services"]["dashboard"]
            return format_dashboard_link(host, f"{port}{PATH_TOKEN}{token}")
        return f"{link}{'&' if '?' in link else '?'}token={token}"

    def status_jobs(self) -> dict:
        """Every job of the cluster and its state (``dask-spank status --json``)."""
        return json.loads(_cli("status", self.name, "--json"))

    def job_logs(self) -> dict[str, str]:
        """The job logs (dask output and the agent's lifecycle lines), by
        job; where they are comes from ``dask-spank logs --json``."""
        out = {}
        for label, path in json.loads(_cli("logs", self.name, "--json")).items():
            try:
                out[f"job {label}"] = Path(path).read_text(errors="replace")
            except OSError:
                continue
        return out

    async def _get_logs(self, cluster=True, scheduler=True, workers=True):
        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=workers)
        if cluster:
            logs.update(await asyncio.get_running_loop().run_in_executor(None, self.job_logs))
        return logs

    async def _close(self):
        if self.status == Status.closed:
            return
        # Closing from now on, not only once the jobs are down: the Dask
        # panel's discovery leaves a closing cluster to its closer.
        self.status = Status.closing
        if self.shutdown_on_close and self.paths:
            await self._cli("down", self.name)
        await super()._close()


def policy() -> dict[str, str]:
    """The site's defaults and limits for dask jobs, as the plugin applies
    them (``dask-spank policy``): ``{"worker_mem": "3G", "worker_mem_max":
    "32G", ...}``."""
    return json.loads(_cli("policy", "--json"))


def connect(name: str, **kwargs):
    """A ``distributed.Client`` of the existing cluster ``name``."""
    from distributed import Client

    return Client(SpankCluster(name, shutdown_on_close=False), **kwargs)
