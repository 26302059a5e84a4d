"""JupyterLab's Dask panel (dask-labextension) with dask-spank clusters.

A Jupyter server extension, enabled where the package is installed
(``etc/jupyter/jupyter_server_config.d/dask_spank.json``); it does nothing
in a server without dask-labextension. The panel's "+NEW" makes clusters
with the factory of dask's configuration (``labextension.factory``:
module ``dask_spank``, class ``SpankCluster``, see docs/user.md), in the
server's event loop. dask-labextension's manager knows only the clusters
it made, names them after their class and proxies dashboards to localhost
only; this extension, in the same loop, adds what a Slurm user needs:

* **Every cluster of the user is listed.** Every ``discovery-interval``
  seconds (dask's configuration: ``dask-spank.jupyter.discovery-interval``,
  10 by default, 0 for never) ``dask-spank ls`` names the user's clusters;
  one whose scheduler runs and that the panel does not list (started with
  ``dask-spank up``, sbatch, a notebook) is attached and listed; one whose
  scheduler is gone leaves the list (nothing is cancelled). Shutting a
  cluster down in the panel is ``dask-spank down``, whoever started it.
* **Under its dask-spank name**, as ``dask-spank ls`` shows it (not
  "SpankCluster 1"), unless the panel's configuration names it.
* **Its dashboard, private.** The panel shows plots through the Jupyter
  server (``dask/dashboard/<id>/<path>``), which proxies them to the
  dashboard's host and port. For a dask-spank cluster the proxied path
  gets the cluster's token as its prefix (``/dask-spank-token/TOKEN/<path>``,
  see boot.py): the browser never sees the token, the Jupyter server's own
  login guards the route, and the scheduler's host (a compute node) is
  allowed, which dask-labextension's proxy refuses for any host but
  localhost.

dask-labextension 7.0 has no hook for any of it: this module reaches into
its manager (``_clusters``, ``_cluster_names``, ``_adaptives``) and its
dashboard handler, and checks that they are what it knows first.
"""
from __future__ import annotations

import asyncio
import json
import uuid

from distributed.core import Status

from .cluster import PATH_TOKEN, DaskSpankError, SpankCluster, _cli

#: Seconds between two discoveries, unless dask's configuration says otherwise.
DISCOVERY_INTERVAL = 10


def _jupyter_server_extension_points():
    return [{"module": "dask_spank.jupyter"}]


def _load_jupyter_server_extension(serverapp):
    log = serverapp.log
    try:
        from dask_labextension import dashboardhandler
        from dask_labextension.manager import manager
    except ImportError:
        log.debug("dask_spank.jupyter: no dask-labextension here: nothing to do")
        return
    missing = [a for a in ("_clusters", "_cluster_names", "_adaptives", "start_cluster")
               if not hasattr(manager, a)]
    handler = getattr(dashboardhandler, "DaskDashboardHandler", None)
    if missing or handler is None or not hasattr(handler, "proxy_open"):
        log.warning("dask_spank.jupyter: this dask-labextension is not the one it knows (7.0): its Dask "
                    "panel lists only the clusters it made, and their dashboards may not show")
        return
    panel = Panel(manager, log)
    panel.name_new_clusters()
    panel.proxy_dashboards(handler)
    from tornado.ioloop import IOLoop

    IOLoop.current().add_callback(panel.discover_forever)
    log.info("dask_spank.jupyter: JupyterLab's Dask panel lists your dask-spank clusters")


class Panel:
    """What the Dask panel's manager gets from dask-spank."""

    def __init__(self, manager, log):
        self.manager = manager
        self.log = log
        self._last_error = None

    def spank_clusters(self) -> dict[str, str]:
        """The panel's dask-spank clusters: name -> the panel's id."""
        return {c.name: cid for cid, c in list(self.manager._clusters.items()) if isinstance(c, SpankCluster)}

    def name_new_clusters(self) -> None:
        """A cluster of "+NEW" is listed under its dask-spank name."""
        start = self.manager.start_cluster

        async def start_cluster(cluster_id: str = "", configuration: dict | None = None):
            configuration = configuration or {}
            model = await start(cluster_id, configuration)
            cluster = self.manager._clusters.get(model["id"])
            if isinstance(cluster, SpankCluster) and not configuration.get("name"):
                self.manager._cluster_names[model["id"]] = model["name"] = cluster.name
            return model

        self.manager.start_cluster = start_cluster

    def proxy_dashboards(self, handler_class) -> None:
        """Proxy a dask-spank cluster's dashboard with its token, to its
        scheduler's host (dask-labextension's handler, patched: it reads
        only the host and port of the dashboard's link)."""
        from jupyter_server_proxy.handlers import ProxyHandler
        from tornado import web

        panel = self
        proxy, open_ = handler_class.proxy, handler_class.open

        def target(handler, cluster_id: str, proxied_path: str):
            cluster = panel.manager._clusters.get(cluster_id)
            if not isinstance(cluster, SpankCluster):
                return None
            token = cluster.dashboard_token()
            port = cluster.scheduler_info.get("services", {}).get("dashboard")
            if not token or not port:
                raise web.HTTPError(404, f"cluster {cluster.name!r} has no dashboard")
            host = cluster.scheduler_address.split("://")[1].split("/")[0].rsplit(":", 1)[0].strip("[]")
            # Its own scheduler's host, from the cluster, not the request.
            handler.host_allowlist = [host]
            return host, port, f"{PATH_TOKEN}{token}/{proxied_path.lstrip('/')}"

        def proxy_spank(self, cluster_id, proxied_path):
            t = target(self, cluster_id, proxied_path)
            return proxy(self, cluster_id, proxied_path) if t is None else ProxyHandler.proxy(self, *t)

        async def open_spank(self, cluster_id, proxied_path):
            t = target(self, cluster_id, proxied_path)
            return await (open_(self, cluster_id, proxied_path) if t is None else self.proxy_open(*t))

        handler_class.proxy, handler_class.open = proxy_spank, open_spank

    async def discover_forever(self) -> None:
        import dask

        value = dask.config.get("dask-spank.jupyter.discovery-interval", default=DISCOVERY_INTERVAL)
        try:
            interval = float(value)
        except (TypeError, ValueError):
            self.log.warning("dask_spank.jupyter: dask-spank.jupyter.discovery-interval: want seconds, not %r; "
                             "taking %ss", value, DISCOVERY_INTERVAL)
            interval = DISCOVERY_INTERVAL
        while interval > 0:
            try:
                await self.discover()
            except Exception as e:  # the next round tries again
                self.log.warning("dask_spank.jupyter: discovering your clusters failed: %s", e)
            await asyncio.sleep(interval)

    async def discover(self) -> None:
        """List the user's running clusters, forget the gone ones."""
        loop = asyncio.get_running_loop()
        try:
            listed = json.loads(await loop.run_in_executor(None, _cli, "ls", "--json"))
        except (DaskSpankError, ValueError) as e:
            if str(e) != self._last_error:
                self.log.warning("dask_spank.jupyter: dask-spank ls failed: %s", e)
            self._last_error = str(e)
            return
        self._last_error = None
        schedulers = {c["cluster"]: c.get("scheduler") for c in listed}
        shown = self.spank_clusters()
        for name, cid in shown.items():
            # One being closed is the closer's to take off the list: the
            # panel's DELETE pops it when its close returns, and fails if
            # it is gone by then.
            cluster = self.manager._clusters.get(cid)
            if cluster is None or cluster.status != Status.running:
                continue
            if schedulers.get(name) not in ("running", "pending"):
                await self.forget(cid)
        # Those this process holds (one "+NEW" is starting) are not attached twice.
        held = {c.name for c in list(SpankCluster._open) if c.status.name != "closed"}
        for name in sorted(n for n, s in schedulers.items() if s == "running" and n not in shown and n not in held):
            try:
                cluster = await SpankCluster(name, shutdown_on_close=True, timeout=30, asynchronous=True)
            except Exception as e:
                self.log.warning("dask_spank.jupyter: cluster %r not listed: %s", name, e)
                continue
            cid = str(uuid.uuid4())
            self.manager._clusters[cid] = cluster
            self.manager._cluster_names[cid] = name
            self.log.info("dask_spank.jupyter: listing cluster %r", name)

    async def forget(self, cluster_id: str) -> None:
        """Take a gone cluster off the list (and close its client side:
        its jobs are not ours to cancel)."""
        cluster = self.manager._clusters.pop(cluster_id, None)
        self.manager._cluster_names.pop(cluster_id, None)
        self.manager._adaptives.pop(cluster_id, None)
        if cluster is not None:
            self.log.info("dask_spank.jupyter: cluster %r ended", cluster.name)
            cluster.shutdown_on_close = False
            try:
                await cluster.close()
            except Exception as e:
                self.log.debug("dask_spank.jupyter: closing %r: %s", cluster.name, e)
