"""Clusters closed to everybody but their owner (issue 13), and the Python
way users work: SpankCluster, Client(cluster), scale, logs, close.

Every cluster talks TLS with credentials of its own, made by its scheduler
job in its private directory. Another user cannot read them, and without
them (or with another cluster's) neither a client nor a worker gets in.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import pytest

import sandboxlib as sb

OTHER = sb.TEST_USER + "-other"


@pytest.fixture(scope="module")
def other_user():
    if subprocess.run(["id", OTHER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", OTHER], check=True)
    return OTHER


def run_as(user: str, code: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Python code run as `user` with the sandbox's venv."""
    return subprocess.run(["runuser", "-u", user, "--", str(sb.VENV / "bin" / "python"), "-c", code, *args],
                          capture_output=True, text=True, check=check, cwd="/", timeout=120)


def test_files_are_private_and_another_user_cannot_run_code_on_the_cluster(cluster_name, other_user):
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    info = sb.wait_scheduler_file(cluster_name)
    d = sb.cluster_dir(cluster_name)
    assert info["address"].startswith("tls://"), info
    for p in [d, *d.iterdir()]:
        if p.name == "jobs":
            continue
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    # Another user: the scheduler file (and the key) cannot be read...
    r = run_as(other_user, "import sys; open(sys.argv[1]).read()", str(d / "scheduler.json"))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    # ... and the address, found anyway (ss, a port scan), runs nothing:
    # plain TCP is refused, and so is TLS without this cluster's credentials.
    attack = textwrap.dedent("""
        import sys
        from distributed import Client
        for address in (sys.argv[1], sys.argv[1].replace("tls://", "tcp://")):
            try:
                c = Client(address, timeout=5)
            except Exception as e:
                print("refused", type(e).__name__)
                continue
            print("RAN", c.submit(lambda: __import__("os").getuid()).result(timeout=10))
    """)
    r = run_as(other_user, attack, info["address"])
    assert "RAN" not in r.stdout and r.stdout.count("refused") == 2, (r.stdout, r.stderr[-2000:])
    sb.run(["scancel", sched])


def test_a_worker_without_the_clusters_certificate_is_refused(cluster_name, other_user):
    """Two clusters of the test user: a worker holding the credentials of
    one cannot join the other (nor can another user holding them)."""
    a, b = cluster_name + "-a", cluster_name + "-b"
    for n in (a, b):
        sb.forget_cluster(n)
    sa = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={a}")
    sbj = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={b}")
    addr_a = sb.wait_scheduler_file(a)["address"]
    sb.wait_scheduler_file(b)
    creds = sb.WORK / f"creds-of-{b}"
    shutil.rmtree(creds, ignore_errors=True)
    creds.mkdir()
    for f in ("ca.pem", "tls.pem", "tls.key"):
        shutil.copy(sb.cluster_dir(b) / f, creds / f)
    os.system(f"chown -R {other_user}: {creds}")
    worker = textwrap.dedent("""
        import asyncio, sys
        from distributed import Worker
        from distributed.security import Security
        d = sys.argv[2]
        sec = Security(tls_ca_file=f"{d}/ca.pem", tls_worker_cert=f"{d}/tls.pem",
                       tls_worker_key=f"{d}/tls.key", require_encryption=True)
        async def main():
            try:
                w = await asyncio.wait_for(Worker(sys.argv[1], security=sec, nthreads=1), 15)
                print("JOINED")
                await w.close()
            except Exception as e:
                print("refused", type(e).__name__)
        asyncio.run(main())
    """)
    r = run_as(other_user, worker, addr_a, str(creds))
    assert "JOINED" not in r.stdout and "refused" in r.stdout, (r.stdout, r.stderr[-2000:])
    c = sb.client(a)
    assert sb.connected_workers(c) == {}
    c.close()
    sb.run(["scancel", sa, sbj])


# A raw TLS client that trusts anything (verification off) and offers the
# certificate it is given, or none: what the server says, seen from the
# client. "refused: ..." is the server's alert or its closing the
# connection; "ACCEPTED" is a server still waiting for the dask handshake
# 5 s after the TLS one (a server that does not require client
# certificates).
RAW_TLS = """
import socket, ssl, sys
host, port = sys.argv[1].rsplit("://", 1)[1].rsplit(":", 1)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if len(sys.argv) > 2:
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
try:
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.settimeout(5)
            data = tls.recv(1)
            print("refused: closed" if data == b"" else "ACCEPTED: " + repr(data))
except socket.timeout:
    print("ACCEPTED: the server waits for the dask handshake")
except (ssl.SSLError, ConnectionError) as e:
    print("refused:", e)
"""


def test_the_scheduler_and_workers_refuse_tls_without_the_clusters_certificate(cluster_name, other_user):
    """Seen from the servers: a TLS client without a certificate, and one
    with another cluster's (its own verification off, so only the server
    can refuse), are refused by the scheduler and by a worker, each saying
    so in its log."""
    other = cluster_name + "-b"
    for n in (cluster_name, other):
        sb.forget_cluster(n)
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    workers = sb.sbatch("--dask-role=worker", f"--dask-cluster={cluster_name}")
    sched_b = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={other}")
    sb.wait_scheduler_file(other)
    c = sb.client(cluster_name)
    try:
        c.wait_for_workers(1, timeout=120)
        info = c.scheduler_info()
    finally:
        c.close()
    [worker_addr] = info["workers"]
    creds = sb.WORK / f"creds-of-{other}"
    shutil.rmtree(creds, ignore_errors=True)
    creds.mkdir()
    for f in ("tls.pem", "tls.key"):
        shutil.copy(sb.cluster_dir(other) / f, creds / f)
    os.system(f"chown -R {other_user}: {creds}")
    for address in (info["address"], worker_addr):
        for cert in ([], [str(creds / "tls.pem"), str(creds / "tls.key")]):
            r = run_as(other_user, RAW_TLS, address, *cert)
            assert r.stdout.startswith("refused"), (address, cert, r.stdout, r.stderr[-2000:])
    logs = {"scheduler": sb.WORK / "log" / f"dask-scheduler-{sched}.log",
            "worker": sb.WORK / "log" / f"dask-worker-{workers}.log"}
    for role, log in logs.items():
        text = sb.wait_until(f"the {role}'s log to say it refused both", lambda: (
            t if (t := log.read_text(errors="replace")).count("TLS handshake failed") >= 2 else None), 30)
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text, text[-3000:]
        assert "CERTIFICATE_VERIFY_FAILED" in text or "unknown ca" in text.lower(), text[-3000:]
    sb.run(["scancel", sched, workers, sched_b])


NOTEBOOK = """
import os, sys, time
from distributed import Client
from dask_spank import SpankCluster

name = sys.argv[1]
cluster = SpankCluster(name, workers=1, worker_mem="1G", timeout=120)
client = Client(cluster)
client.wait_for_workers(1, timeout=120)
assert client.submit(sum, range(100)).result() == 4950
assert client.run(os.getuid) and set(client.run(os.getuid).values()) == {os.getuid()}
print("repr", repr(cluster))
assert "SpankCluster" in cluster._repr_html_()
print("dashboard", cluster.dashboard_link)
cluster.scale(2)
client.wait_for_workers(2, timeout=120)
logs = cluster.get_logs()
print("logs", sorted(logs))
assert any("worker started, pid" in text for text in logs.values())
client.close()
cluster.close()
print("closed")
"""


def test_the_notebook_flow(cluster_name):
    """The user guide's notebook, run as the test user."""
    r = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", NOTEBOOK, cluster_name], check=False, timeout=600)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    assert "dashboard http://127.0.0.1:" in r.stdout
    assert "closed" in r.stdout
    # close() took the cluster down: no job, no process.
    assert not sb.run(["squeue", "-h", "-n", f"dask-scheduler-{cluster_name},dask-worker-{cluster_name}"]).stdout.strip()
    sb.wait_until("no dask process of the cluster", lambda: not sb.cluster_processes(cluster_name), 15)


def test_python_reads_the_layout_the_cli_defines(cluster_name):
    """One definition of the cluster directory: the Python package asks the
    command, and finds there what the jobs wrote."""
    sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={cluster_name}")
    sb.wait_scheduler_file(cluster_name)
    code = textwrap.dedent("""
        import json, sys
        import dask_spank
        paths = dask_spank.layout(sys.argv[1])
        client = dask_spank.connect(sys.argv[1])
        print(json.dumps({"paths": paths, "address": client.scheduler.address}))
        client.close()
    """)
    r = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", code, cluster_name], check=False, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    d = sb.cluster_dir(cluster_name)
    assert out["paths"]["cluster_dir"] == str(d)
    assert out["paths"]["scheduler_file"] == str(d / "scheduler.json")
    assert out["address"] == json.loads((d / "scheduler.json").read_text())["address"]
    sb.run(["scancel", sched])


def ignores_eof(ctx) -> bool:
    """Whether a TLS context takes a peer that left without close_notify
    as a clean EOF (the flag the workaround sets)."""
    import ssl
    return bool(ctx.options & ssl.OP_IGNORE_UNEXPECTED_EOF)


def eof_flags(server) -> list[bool]:
    """In a dask process: whether its TLS contexts (to connect, to listen)
    have the flag, and whether the error queue is cleared before TLS I/O.
    Sent by value (no import of this module there)."""
    import ssl
    return [ignores_eof(ctx)
            for ctx in (server.connection_args["ssl_context"], server.listener.server_args["ssl_options"])
            ] + [getattr(ssl.SSLSocket, "_dask_spank_clears", False)]


@pytest.mark.parametrize("worker_start", ["exec", "forkserver"])
def test_every_tls_context_of_the_cluster_takes_a_vanished_peer_as_a_clean_eof(policy, cluster_name, worker_start):
    """The workaround for CPython issue 148594 (python/dask_spank/tls_eof.py)
    is in force where it must be: in the scheduler and the workers the
    agent started (exec'd or forked), for the connections they open and
    those they accept, with the error queue cleared before TLS I/O, and in
    the notebook's credentials. (Python 3.11's
    default contexts have the flag anyway: the test proves the workaround
    on 24.11 and 26.05, whose Pythons do not.)"""
    import dask_spank

    policy(f"worker_start={worker_start}")
    from test_nanny import start
    sched, arr, c = start(cluster_name, 2)
    import cloudpickle
    cloudpickle.register_pickle_by_value(__import__(__name__))
    try:
        assert c.run_on_scheduler(lambda dask_scheduler: eof_flags(dask_scheduler)) == [True, True, True]
        on_workers = c.run(lambda dask_worker: eof_flags(dask_worker))
    finally:
        cloudpickle.unregister_pickle_by_value(__import__(__name__))
    assert list(on_workers.values()) == [[True, True, True]] * 2, on_workers
    d = sb.cluster_dir(cluster_name)
    mine = dask_spank.security({"tls_ca": str(d / "ca.pem"), "tls_cert": str(d / "tls.pem"),
                                "tls_key": str(d / "tls.key")})
    assert ignores_eof(mine.get_connection_args("client")["ssl_context"])
    # The boot leaves nothing behind in the job's environment.
    env = c.run(lambda: "DASK_SPANK_BOOT" in __import__("os").environ)
    assert set(env.values()) == {False}, env
    c.close()
