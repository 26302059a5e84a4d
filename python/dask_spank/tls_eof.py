"""Keep one dead TLS peer from closing the healthy TLS connections of a
dask process.

CPython does not clear OpenSSL's per-thread error queue before a TLS read
or write (CPython issue 148594; OpenSSL's SSL_get_error(3) requires it). A
stale entry, left by a failed write to a peer that had gone or by a peer
that left without a TLS close_notify, then fails the next read of any
other connection of the process. Seen with Python 3.14 and OpenSSL 3.6
(Slurm 26.05's sandbox): a scheduler that wrote to a worker that had just
retired closed other live workers' connections and its client's. Two
measures, together:

- clear_before_tls_io(): the queue is cleared before every TLS read and
  write of the process (what the CPython fix will do), through the
  libcrypto the ssl module is linked with;
- every TLS context distributed makes gets OP_IGNORE_UNEXPECTED_EOF, as
  Python 3.11's default contexts had (3.13's and 3.14's do not): a peer
  that leaves without close_notify is a clean end of stream, which leaves
  nothing on the queue. dask frames its messages with their lengths, so a
  connection cut short is still seen as an error.

This file is used twice: the dask_spank package (the notebook's Client)
imports it, and the node agent embeds it to start the dask scheduler and
workers it runs (`node-agent/src/spawning/dask_cmd.rs`), whose Python may not have
dask_spank installed; it needs nothing but the standard library and
distributed.
"""
import ssl

FLAG = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
#: SSLSocket methods that run OpenSSL I/O, before which the queue is cleared.
TLS_IO = ("recv", "recv_into", "read", "send", "sendall", "write", "do_handshake", "unwrap")


def _err_clear_error():
    """OpenSSL's ERR_clear_error, from the one libcrypto this process's ssl
    module is linked with (None where it is not a shared library of its
    own, as in Pythons built with a static OpenSSL)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libcrypto.so" in line}
    except OSError:
        return None
    if len(paths) != 1:
        return None
    try:
        clear = ctypes.CDLL(paths.pop()).ERR_clear_error
    except (OSError, AttributeError):
        return None
    clear.argtypes = []
    clear.restype = None
    return clear


def clear_before_tls_io():
    """Clear the thread's OpenSSL error queue before every TLS read and
    write of this process, as OpenSSL requires (SSL_get_error(3)) and
    CPython does not (issue 148594): a stale entry, from a write to a peer
    that had gone, can no longer fail another connection's read. Once per
    process; False where libcrypto cannot be reached."""
    if getattr(ssl.SSLSocket, "_dask_spank_clears", False):
        return True
    clear = _err_clear_error()
    if clear is None:
        return False
    import functools

    for name in TLS_IO:
        io = getattr(ssl.SSLSocket, name)

        def cleared(self, *args, _io=io, **kwargs):
            clear()
            return _io(self, *args, **kwargs)

        setattr(ssl.SSLSocket, name, functools.update_wrapper(cleared, io))
    ssl.SSLSocket._dask_spank_clears = True
    return True


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

    clear_before_tls_io()
    make = getattr(Security, "_get_tls_context", None)
    if make is None or getattr(make, "_dask_spank_tls_eof", False):
        return

    def _get_tls_context(self, tls, purpose):
        return ignore_unexpected_eof(make(self, tls, purpose))

    _get_tls_context._dask_spank_tls_eof = True
    Security._get_tls_context = _get_tls_context
