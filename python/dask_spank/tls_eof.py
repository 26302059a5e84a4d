"""Keep one dead TLS peer from closing the healthy TLS connections of a
dask process.

In CPython (seen with Python 3.14 and OpenSSL 3.6; CPython issue 148594),
a failed write to a peer that went away leaves an error on OpenSSL's
per-thread error queue, and the next TLS read of any other connection of
the process reports it: a scheduler that wrote to a worker that had just
retired closes its client's connection, or another worker's. With
OP_IGNORE_UNEXPECTED_EOF, a peer that leaves without a TLS close_notify is
a clean end of stream, OpenSSL has no alert to write to the dead socket,
and nothing is left on the queue. (Python 3.11's default contexts had the
flag; 3.13's and 3.14's do not, and only 3.14 was seen to drop
connections.) dask frames its messages with their lengths, so a
connection cut short is still seen as an error.

This file is used twice: the dask_spank package (the notebook's Client)
imports it, and the node agent embeds it to start the dask scheduler and
workers it runs (`node-agent/src/dask_cmd.rs`), whose Python may not have
dask_spank installed; it needs nothing but the standard library and
distributed.
"""
import ssl

FLAG = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def ignore_unexpected_eof(ctx):
    """The same context, with a peer that leaves without close_notify
    treated as a clean end of stream (where this OpenSSL has the flag)."""
    if ctx is not None and FLAG:
        ctx.options |= FLAG
    return ctx


def patch_distributed():
    """Make every TLS context distributed makes in this process ignore
    unexpected EOFs. For processes that build their Security from dask's
    configuration (dask-scheduler, dask-worker): there is no other place
    to reach their contexts. Does nothing where distributed (or this hook
    of it) is missing: what runs next reports a missing distributed."""
    try:
        from distributed.security import Security
    except ImportError:
        return

    make = getattr(Security, "_get_tls_context", None)
    if make is None or getattr(make, "_dask_spank_tls_eof", False):
        return

    def _get_tls_context(self, tls, purpose):
        return ignore_unexpected_eof(make(self, tls, purpose))

    _get_tls_context._dask_spank_tls_eof = True
    Security._get_tls_context = _get_tls_context


def run_module():
    """Entry point of the node agent's boot code
    (`python -c BOOT distributed.cli.dask_worker ARGS...`): patch
    distributed, then run the module exactly as `python -m` does, its
    errors (a missing distributed) included."""
    import runpy
    import sys

    patch_distributed()
    module = sys.argv.pop(1)
    runpy._run_module_as_main(module, alter_argv=True)
