"""The node agent's protocol in Python, for the sandbox helpers, the bench
and the tests: one definition, standard library only, so that it also runs
as the unprivileged test user (`python3 -c SOURCE ...`, see `as_command`).

Framing (common/src/frame.rs): a 4-byte big-endian length, then that many
bytes of JSON. Every connection opens with a handshake. The Rust side is
the reference: its types make docs/agent-protocol.schema.json
(`dask-node-agent schema`), and tests/test_protocol.py validates what this
module, the bench and the tests send against it; a test in
common/src/lib.rs checks that VERSION matches.

Command line (for a process of another user):
  python3 agentproto.py call SOCKET REQUEST_JSON       one request, prints the reply
  python3 agentproto.py attach SOCKET JOB_ID CLUSTER_DIR [LOG [EXTRA_JSON]]
        attach like `dask-spank attach` (log: /dev/null; EXTRA_JSON: more
        fields of the attach message), print every reply up to `finished`
        as one JSON line each
  python3 agentproto.py attach-many SOCKET FIRST N CLUSTER_DIR LOG
        attach to jobs FIRST..FIRST+N-1, print one JSON line when all are
        attached, hold the connections until stdin closes
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

VERSION = 3


class AgentError(RuntimeError):
    pass


class Conn:
    """One connection to the agent, handshake done."""

    def __init__(self, path: str, client: str = "test", timeout: float | None = 60, version: int = VERSION):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        try:
            self.send(hello(client, version))
        except OSError:
            pass  # refused at once: the agent's reason is still to be read
        welcome = self.recv()
        if welcome.get("type") != "welcome":
            self.sock.close()
            raise AgentError(welcome.get("message") or json.dumps(welcome))

    def _exact(self, n: int) -> bytes:
        d = b""
        while len(d) < n:
            c = self.sock.recv(n - len(d))
            if not c:
                raise AgentError("the agent closed the connection")
            d += c
        return d

    def send(self, msg: dict) -> None:
        b = json.dumps(msg).encode()
        self.sock.sendall(struct.pack(">I", len(b)) + b)

    def recv(self) -> dict:
        n = struct.unpack(">I", self._exact(4))[0]
        return json.loads(self._exact(n))

    def call(self, req: dict) -> dict:
        self.send(req)
        return self.recv()

    def send_fd(self, fd: int) -> None:
        socket.send_fds(self.sock, [b"F"], [fd])

    def close(self) -> None:
        self.sock.close()


def hello(client: str, version: int = VERSION) -> dict:
    """The first frame of every connection."""
    return {"version": version, "client": client}


def attach_request(job_id: int, cluster_dir: str, env: list | None = None, cwd: str | None = None,
                   extra: dict | None = None) -> dict:
    """The request `dask-spank attach` opens its session with."""
    return {"type": "attach", "job_id": job_id, "cwd": cwd or os.getcwd(),
            "env": env if env is not None else sorted(os.environ.items()),
            "cluster_dir": cluster_dir, **(extra or {})}


def call(path: str, req: dict, client: str = "test") -> dict:
    """Send one request, return the reply."""
    c = Conn(path, client)
    try:
        return c.call(req)
    finally:
        c.close()


def attach(path: str, job_id: int, cluster_dir: str, log_fd: int, env: list | None = None,
           cwd: str | None = None, extra: dict | None = None) -> Conn:
    """Attach to a job as `dask-spank attach` does; the connection is
    returned once the agent said `attached` (AgentError otherwise)."""
    c = Conn(path, "attach", timeout=None)
    r = c.call(attach_request(job_id, cluster_dir, env, cwd, extra))
    if r.get("type") != "send_log_fd":
        c.close()
        raise AgentError(json.dumps(r))
    c.send_fd(log_fd)
    r = c.recv()
    if r.get("type") != "attached":
        c.close()
        raise AgentError(json.dumps(r))
    return c


def as_command(*args: str) -> list[str]:
    """A command line running this module with `args` in a fresh Python,
    without needing the file to be readable by the user who runs it."""
    with open(__file__) as f:
        source = f.read()
    return ["/usr/bin/python3", "-c", source, *args]


def _attach_many(path: str, first: int, n: int, cluster_dir: str, log: str) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # A batch job's environment: the user's, plus what Slurm sets (about 60
    # SLURM_* variables, 3 KiB).
    env = dict(os.environ)
    for i in range(int(os.environ.get("BENCH_ENV_VARS", "60"))):
        env[f"SLURM_BENCH_VAR_{i:02d}"] = "x" * 40
    env = sorted(env.items())
    t0 = time.monotonic()
    conns = [attach(path, first + i, cluster_dir, logfd, env=env) for i in range(n)]
    print(json.dumps({"attached": n, "seconds": time.monotonic() - t0}), flush=True)
    sys.stdin.read()
    for c in conns:
        c.close()


def _main(argv: list[str]) -> int:
    cmd, path = argv[0], argv[1]
    if cmd == "call":
        try:
            reply = call(path, json.loads(argv[2]))
        except (AgentError, OSError) as e:
            reply = {"type": "error", "message": str(e)}
        print(json.dumps(reply))
    elif cmd == "attach":
        log = argv[4] if len(argv) > 4 else os.devnull
        extra = json.loads(argv[5]) if len(argv) > 5 else None
        # "fd:N": a descriptor this process holds already (opened by its
        # job script), passed as it is, without opening anything.
        fd = int(log[3:]) if log.startswith("fd:") else os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            c = attach(path, int(argv[2]), argv[3], fd, extra=extra)
        except AgentError as e:
            print(str(e), flush=True)
            return 0
        print(json.dumps({"type": "attached"}), flush=True)
        while True:
            r = c.recv()
            print(json.dumps(r), flush=True)
            if r.get("type") == "finished":
                return 0
    elif cmd == "attach-many":
        _attach_many(path, int(argv[2]), int(argv[3]), argv[4], argv[5])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
