"""The hung_fs fixture: a FUSE filesystem mounted by the unprivileged test
user (tests/hangfs.py, through the setuid fusermount3, as an attacker
would), that the test can freeze and kill.

    def test_something(hung_fs):
        hung_fs.mount            # Path under sb.WORK: dir/, log, env/bin/python3
        hung_fs.freeze()         # SIGSTOP the daemon: every access waits
        hung_fs.thaw()           # SIGCONT
        hung_fs.kill()           # SIGKILL: every access fails at once (ENOTCONN)

Without allow_other (the default) the kernel lets only the test user in:
root gets EACCES at once and never waits. For a filesystem that root
reaches (and can hang on), as where a site allows user_allow_other:

    @pytest.mark.parametrize("hung_fs", [{"allow_other": True}], indirect=True)

Where the mount lives: in the mount namespace (and root directory) of the
node agent of n1, so that the agent, slurmd and the jobs see it. On Slurm
22.05 that is the host's; on 24.11 and 26.05 it is the private namespace of
the chroot that started the sandbox, which need not be the tests' own (a
sandbox brought up by an earlier `scripts/sandbox --slurm V up`). So run
whatever must see the mount through hung_fs.popen()/run() (as the test
user by default, or as root), not directly from the test process.

A filesystem of the site's own (a hung NFS or a site's FUSE mount, which
the agent cannot refuse the way it refuses a user's FUSE): the daemon runs
as root, with allow_other (user_id=0 in mountinfo):

    @pytest.mark.parametrize("hung_fs", [{"as_root": True}], indirect=True)

Teardown kills the daemon (by its PID) and unmounts lazily, as its owner.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import sandboxlib as sb

HANGFS = Path(__file__).resolve().parent / "hangfs.py"


def proc_state(pid: int) -> str:
    """One-letter state of a process (R, S, D, T, Z...), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class HungFS:
    def __init__(self, mount: Path, allow_other: bool = False, as_root: bool = False):
        self.mount = mount
        self.allow_other = allow_other or as_root
        self.as_root = as_root
        self.proc: subprocess.Popen | None = None
        # The namespace of the node's daemons, taken now: a test may
        # restart the agent later.
        self.ns_pid = sb.agent_pid()
        self.log = sb.LOGS / f"{mount.name}.log"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _cmd(self, args: list[str], user: bool) -> list[str]:
        # nsenter and setpriv exec (no fork): the pid of the Popen is that
        # of the command itself, so the test can signal it.
        # The agent was restarted (a policy change that rebuilt it): the new
        # one's, once its pid file names a live process (a dead or zombie
        # agent has no namespace left to enter).
        end = time.monotonic() + 30
        while proc_state(self.ns_pid) in ("", "Z", "X") and time.monotonic() < end:
            time.sleep(0.1)
            self.ns_pid = sb.agent_pid()
        enter = ["nsenter", f"--target={self.ns_pid}", "--mount", "--root", "--wd"]
        if user:
            pw = sb.user()
            enter += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
        return [*enter, "env", "-C", str(sb.WORK), *args]

    def popen(self, args: list[str], user: bool = True, **kw) -> subprocess.Popen:
        """Start a command where the mount is, as the test user (with its
        environment, in sb.WORK) or as root."""
        env = {"HOME": str(sb.HOME), "USER": sb.TEST_USER, "LOGNAME": sb.TEST_USER,
               "SLURM_CONF": sb.ENV["SLURM_CONF"],
               "PATH": f"{sb.VENV}/bin:{sb.BIN}:/usr/local/bin:/usr/bin:/bin"} if user else sb.ENV
        return subprocess.Popen(self._cmd(args, user), env=env, **kw)

    def run(self, args: list[str], user: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        with self.popen(args, user, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
            out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def start(self, timeout: float = 30) -> None:
        # The user runs its own copy: the checkout may be private to root.
        script = sb.WORK / "hangfs.py"
        shutil.copyfile(HANGFS, script)
        os.chmod(script, 0o644)
        # What an earlier, interrupted run may have left at that path.
        self.run(["fusermount3", "-u", "-z", "-q", str(self.mount)])
        self.run(["mkdir", "-p", str(self.mount)]).check_returncode()
        args = [str(sb.VENV / "bin" / "python3"), str(script), str(self.mount)]
        if self.allow_other:
            args.insert(2, "--allow-other")
        with open(self.log, "ab") as log:
            self.proc = self.popen(args, user=not self.as_root, stdout=subprocess.PIPE, stderr=log,
                                   start_new_session=True)
        # "ready" once the kernel has sent its first request.
        out, end = b"", time.monotonic() + timeout
        while not out.endswith(b"\n"):
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 64) if ready else b""
            if not chunk:
                raise RuntimeError(f"hangfs did not mount {self.mount} (exit {self.proc.poll()}): "
                                   + self.log.read_text(errors="replace")[-2000:])
            out += chunk
        self.proc.stdout.close()
        assert out == b"ready\n", out
        uid = int(Path(f"/proc/{self.pid}/status").read_text().split("\nUid:")[1].split()[0])
        assert uid == (0 if self.as_root else sb.user().pw_uid), f"pid {self.pid} is not the daemon (uid {uid})"

    def mountinfo(self) -> str | None:
        """The mount's line of /proc/PID/mountinfo, in the node's namespace."""
        for pid in (self.pid, self.ns_pid):
            try:
                lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            except OSError:
                continue
            return next((l for l in lines if l.split()[4] == str(self.mount)), None)
        return None

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        # Signals arrive asynchronously: be sure it is stopped before the
        # test goes on.
        sb.wait_until("hangfs to stop", lambda: proc_state(self.pid) in ("T", "t"), 10, 0.01)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        sb.wait_until("hangfs to go on", lambda: proc_state(self.pid) not in ("T", "t"), 10, 0.01)

    def kill(self) -> None:
        """SIGKILL: its /dev/fuse descriptor closes with it, which aborts
        the connection (every access: ENOTCONN; the mount stays)."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None:
            self.kill()
        # Lazily, as its owner (fusermount3 refuses anybody else's mount).
        p = self.run(["fusermount3", "-u", "-z", str(self.mount)], user=not self.as_root)
        self.run(["rmdir", str(self.mount)], user=not self.as_root)
        assert self.proc is None or self.mountinfo() is None, f"{self.mount} still mounted: {p.stderr}"


@pytest.fixture
def hung_fs(request):
    """A HungFS mounted at sb.WORK/hangfs-<test name>; parametrize it
    indirectly with {"allow_other": True} to let root in."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    fs = HungFS(sb.WORK / f"hangfs-{name}", **getattr(request, "param", {}))
    try:
        fs.start()
        yield fs
    finally:
        fs.close()
