"""Dask clusters as Slurm jobs, through dask-spank.

* :class:`SpankCluster` follows ``distributed.deploy.Cluster``:
  ``Client(cluster)``, ``cluster.scale(n)``, ``cluster.dashboard_link``,
  ``cluster.get_logs()``, ``cluster.close()``, its notebook widget.
* :func:`connect` returns a ``Client`` of an existing cluster.
* :func:`policy` returns the site's defaults and limits for dask jobs;
  ``cluster.job_script()`` the sbatch command lines a start submits.
* :func:`security` returns the ``Security`` of a cluster (its TLS
  credentials); :func:`security_loader` makes a plain
  ``Client("tls://...")`` find them (``distributed.client.security-loader``;
  distributed does not call it for ``Client(scheduler_file=...)``).
"""
from .cluster import SpankCluster, connect, layout, policy, security, security_loader

__all__ = ["SpankCluster", "connect", "layout", "policy", "security", "security_loader"]
__version__ = "0.1.0"
