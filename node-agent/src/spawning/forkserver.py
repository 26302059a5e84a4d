# dask-spank fork server. The node agent runs it as the job's user, with the
# job's environment and its own Python, when the site policy says
# worker_start=forkserver. It imports distributed once; each worker is then
# a fork of this process, which skips the interpreter start and the imports
# (most of a cold start), so a crashed worker is back within a fraction of
# the Nanny's restart time.
#
# Protocol, on stdin (a Unix socket to the agent), one JSON object per line:
#   agent -> server: {"args": [...]}          dask-worker arguments
#   server -> agent: {"event": "ready"}       distributed is imported
#                    {"event": "forked", "pid": N}
#                    {"event": "exited", "pid": N, "status": S}   (waitpid)
# When the agent closes the socket, the server kills its workers and exits.
import ctypes
import json
import os
import selectors
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15  # the name top and ps -o comm show


def main() -> None:
    ctl = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    import distributed.cli.dask_worker as dask_worker  # the cold part, once

    patch_distributed()  # defined before this file: python/dask_spank/tls_eof.py
    protect_dashboard()  # and python/dask_spank/boot.py
    mark_restarts()
    wait_for_scheduler_file()
    import_timed_start()  # and what a worker's timed start imports, once
    say_python("the fork server")

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, b"dask-forkserver", 0, 0, 0)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    server_pid = os.getpid()
    children: set[int] = set()

    def send(msg: dict) -> None:
        ctl.sendall(json.dumps(msg).encode() + b"\n")

    def worker(args: list[str]) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)
            ctl.close()
            # Its own process group, so that the agent can stop one worker
            # and its children without touching the server.
            os.setpgid(0, 0)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            libc.prctl(PR_SET_NAME, b"dask-worker", 0, 0, 0)
            if os.getppid() != server_pid:
                os._exit(1)
            dask_worker.main(args=[*worker_class_args(), *args], prog_name="dask-worker")
            code = exit_code(0)
        except SystemExit as e:
            code = exit_code(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            send({"event": "exited", "pid": pid, "status": status})

    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    send({"event": "ready"})
    pending = b""
    while True:
        for key, _ in sel.select():
            if key.fileobj is ctl:
                data = ctl.recv(1 << 16)
                if not data:
                    for pid in children:
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    os._exit(0)
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    args = json.loads(line)["args"]
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        worker(args)
                    # Here too (the child does it as well): the agent checks
                    # that the pid leads its own group as soon as it hears.
                    try:
                        os.setpgid(pid, pid)
                    except OSError:
                        pass
                    children.add(pid)
                    send({"event": "forked", "pid": pid})
            else:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                reap()


if __name__ == "__main__":
    main()
