#!/usr/bin/env python3
"""A tiny in-memory FUSE filesystem that a test can freeze.

    python3 tests/hangfs.py [--allow-other] MOUNTPOINT

Run as the unprivileged test user, it mounts itself through the setuid
fusermount3, as any user of a site can, and serves:

    dir/             an empty directory (a job's working directory; files
                     made in it are kept in memory)
    log              a writable regular file (writes kept in memory)
    env/bin/python3  an executable regular file (a script that runs
                     /usr/bin/python3), and env/bin/python the same (what
                     --dask-env runs)
    hang             not listed: looking it up stops the daemon (SIGSTOP to
                     itself) in the middle of that request; thawed, it
                     answers ENOENT

It prints "ready" on stdout once it has answered a first stat of the
mount point (INIT answered too: frozen before that, every access would
wait for INIT, not for its own request), then serves until killed. The
test freezes it with SIGSTOP: every request then waits for an answer that
does not come. SIGKILL closes its /dev/fuse descriptor, which aborts the
connection: the waiting accesses fail (ECONNABORTED, or ENOTCONN for one
that waited behind another), and every later access fails at once with
ENOTCONN until the mount is removed (`fusermount3 -u -z MOUNTPOINT`, as
the user).

Frozen from outside while idle, the daemon holds no request (it waits in
read() on /dev/fuse): each request stays queued in the kernel, and a
SIGKILL ends the process waiting for it. Not so for a process that waits
for another's request: the lookup of a name the kernel does not know yet
holds the directory's lock while it waits (this connection has no
parallel directory operations), so another lookup in that directory, or
of that name, waits behind it uninterruptibly (D state, wchan
fuse_lock_inode or d_alloc_parallel), SIGKILL or not, until the first one
ends. Frozen inside a request (the `hang` name), the daemon has read it:
a SIGKILL then does not end the process waiting for it, which goes on
waiting uninterruptibly (D state) until the daemon answers or dies: the
worst a user's filesystem can do to whoever touches it.

Nothing is cached by the kernel (attr/entry timeouts 0, direct_io), so
that every access of a frozen mount reaches the frozen daemon.

Without --allow-other only the mounting user gets through: the kernel
refuses everybody else, root included, with EACCES before asking the
daemon. --allow-other lets everybody in (root too), which a user may ask
for only where /etc/fuse.conf has user_allow_other.

Standard library and mfusepy (ctypes bindings for libfuse 3) only.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import threading
import time

# mfusepy would take libfuse 2 if it were installed; we want libfuse 3
# (fusermount3) everywhere.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy as fuse  # noqa: E402

PYTHON3 = b'#!/bin/sh\nexec /usr/bin/python3 "$@"\n'


class HangFS(fuse.Operations):
    use_ns = True  # times in nanoseconds (mfusepy warns otherwise)

    def __init__(self, mountpoint: str):
        self.mountpoint = mountpoint
        now = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()
        # path -> mode and, for regular files, content.
        self.nodes: dict[str, dict] = {}
        for d in ("/", "/dir", "/env", "/env/bin"):
            self.nodes[d] = {"mode": stat.S_IFDIR | 0o755, "time": now}
        self.nodes["/log"] = {"mode": stat.S_IFREG | 0o644, "data": bytearray(), "time": now}
        for py in ("/env/bin/python3", "/env/bin/python"):
            self.nodes[py] = {"mode": stat.S_IFREG | 0o755, "data": bytearray(PYTHON3), "time": now}

    def _node(self, path: str) -> dict:
        try:
            return self.nodes[path]
        except KeyError:
            raise fuse.FuseOSError(errno.ENOENT) from None

    def init(self, path):
        # Called on the kernel's first request (FUSE_INIT), before it is
        # answered: a thread of ours stats the mount point, which the loop
        # answers after INIT.
        threading.Thread(target=self._ready, daemon=True).start()

    def _ready(self):
        os.stat(self.mountpoint)
        print("ready", flush=True)

    def getattr(self, path, fh=None):
        if path == "/hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        n = self._node(path)
        is_dir = stat.S_ISDIR(n["mode"])
        return {"st_mode": n["mode"], "st_nlink": 2 if is_dir else 1,
                "st_size": 0 if is_dir else len(n["data"]),
                "st_uid": self.uid, "st_gid": self.gid,
                "st_atime": n["time"], "st_mtime": n["time"], "st_ctime": n["time"]}

    def readdir(self, path, fh):
        if not stat.S_ISDIR(self._node(path)["mode"]):
            raise fuse.FuseOSError(errno.ENOTDIR)
        prefix = path.rstrip("/") + "/"
        names = [p[len(prefix):] for p in self.nodes
                 if p != path and p.startswith(prefix) and "/" not in p[len(prefix):]]
        return [".", "..", *names]

    def open(self, path, flags):
        if stat.S_ISDIR(self._node(path)["mode"]):
            raise fuse.FuseOSError(errno.EISDIR)
        return 0

    def create(self, path, mode):
        parent = self._node(os.path.dirname(path))
        if not stat.S_ISDIR(parent["mode"]):
            raise fuse.FuseOSError(errno.ENOTDIR)
        self.nodes[path] = {"mode": stat.S_IFREG | (mode & 0o777), "data": bytearray(), "time": time.time_ns()}
        return 0

    def read(self, path, size, offset, fh):
        return bytes(self._node(path)["data"][offset:offset + size])

    def write(self, path, data, offset, fh):
        buf = self._node(path)["data"]
        if len(buf) < offset:
            buf.extend(bytes(offset - len(buf)))
        buf[offset:offset + len(data)] = data
        return len(data)

    def truncate(self, path, length, fh=None):
        buf = self._node(path)["data"]
        del buf[length:]
        buf.extend(bytes(length - len(buf)))
        return 0

    def unlink(self, path):
        if stat.S_ISDIR(self._node(path)["mode"]):
            raise fuse.FuseOSError(errno.EISDIR)
        del self.nodes[path]
        return 0

    def chmod(self, path, mode):
        n = self._node(path)
        n["mode"] = stat.S_IFMT(n["mode"]) | (mode & 0o7777)
        return 0

    def utimens(self, path, times=None):
        self._node(path)["time"] = times[1] if times else time.time_ns()
        return 0

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1024, "f_bfree": 1024,
                "f_bavail": 1024, "f_files": 1024, "f_ffree": 1024, "f_namemax": 255}


def main() -> int:
    args = sys.argv[1:]
    allow_other = "--allow-other" in args
    args = [a for a in args if a != "--allow-other"]
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    # foreground: the PID the test holds is the daemon's (no fork);
    # nothreads: one thread serves the requests in turn, so the in-memory
    # tree needs no lock.
    try:
        fuse.FUSE(HangFS(os.path.abspath(args[0])), args[0], foreground=True, nothreads=True,
                  fsname="hangfs", allow_other=allow_other, attr_timeout=0, entry_timeout=0,
                  negative_timeout=0, direct_io=True)
    except RuntimeError as e:
        # fuse_main's 8: SIGTERM or SIGINT ended the loop (libfuse unmounted).
        if str(e) != "8":
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
