"""The hung_fs fixture itself (tests/hangfs_fixture.py): a FUSE filesystem
of the test user serves the user and its jobs; frozen, it makes whoever
touches it wait; killed, it fails every access at once. What the tests of
"the root node agent never waits on a user's filesystem" rely on.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

import sandboxlib as sb
from hangfs_fixture import proc_state

# stat(2) on argv[1]: says "go" first (so that a test times the syscall,
# not Python's start), then the outcome and how long it took.
PROBE = """
import errno, os, sys, time
print("go", flush=True)
t = time.monotonic()
try:
    os.stat(sys.argv[1])
    r = "ok"
except OSError as e:
    r = errno.errorcode[e.errno]
print(r, round(time.monotonic() - t, 3), flush=True)
"""


def probe(fs, path, user=True) -> subprocess.Popen:
    # Unbuffered: readline() takes no more than "go", and communicate()
    # gets the rest.
    p = fs.popen(["python3", "-c", PROBE, str(path)], user=user, stdout=subprocess.PIPE, bufsize=0)
    assert p.stdout.readline() == b"go\n"
    return p


def outcome(p: subprocess.Popen, timeout: float) -> tuple[str, float]:
    out, _ = p.communicate(timeout=timeout)
    r, secs = out.decode().split()
    return r, float(secs)


def stat(fs, path, user=True) -> str:
    r, secs = outcome(probe(fs, path, user), 30)
    assert secs < 1, f"stat {path} took {secs}s"
    return r


def test_hangfs_serves_its_user_and_the_users_jobs(hung_fs):
    fs, m = hung_fs, hung_fs.mount
    # Mounted by the user through fusermount3: the kernel records its uid.
    info = fs.mountinfo()
    assert info and " - fuse hangfs " in info, info
    assert f"user_id={sb.user().pw_uid}," in info and "allow_other" not in info, info
    assert fs.run(["ls", str(m)]).stdout.split() == ["dir", "env", "log"]
    assert fs.run(["sh", "-c", f"echo one >> {m}/log && cat {m}/log"]).stdout == "one\n"
    assert fs.run([f"{m}/env/bin/python3", "-c", "print('py')"]).stdout == "py\n"
    # Root is refused at once, without asking the daemon.
    assert stat(fs, m / "dir", user=False) == "EACCES"

    # A job of the user works in it.
    script = sb.WORK / "hangfs-job.sh"
    script.write_text('#!/bin/bash\nset -e\ncd "$1/dir"\necho "job $SLURM_JOB_ID in $PWD" >> "$1/log"\n'
                      '"$1/env/bin/python3" -c "print(40 + 2)" > out\n')
    os.chmod(script, 0o755)
    sb.as_user(["mkdir", "-p", "log"])
    job = sb.sbatch("-o", "log/hangfs-%j.log", str(script), str(m))
    sb.wait_job_gone(job, 60)
    assert sb.job_state(job) == "COMPLETED", (sb.WORK / "log" / f"hangfs-{job}.log").read_text()
    assert fs.run(["cat", f"{m}/log"]).stdout == f"one\njob {job} in {m}/dir\n"
    assert fs.run(["cat", f"{m}/dir/out"]).stdout == "42\n"


def test_a_frozen_hangfs_holds_its_user_until_it_is_killed(hung_fs):
    fs, d = hung_fs, hung_fs.mount / "dir"
    assert stat(fs, d) == "ok"
    fs.freeze()
    waiting = probe(fs, d)
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.communicate(timeout=2)
    # It waits interruptibly: the request is still queued in the kernel,
    # and a SIGKILL ends such a waiter at once. (For a name the kernel
    # knows, as here. The lookup of a new name holds the directory's lock
    # while it waits: another lookup in that directory then waits for the
    # lock, uninterruptibly, wchan fuse_lock_inode or d_alloc_parallel.)
    assert proc_state(waiting.pid) == "S", open(f"/proc/{waiting.pid}/wchan").read()
    other = probe(fs, d)
    time.sleep(0.2)
    other.kill()
    assert other.wait(2) == -signal.SIGKILL
    # Killed, the daemon aborts the connection: the waiter gets an error
    # (ECONNABORTED for a request that was queued), every later access
    # ENOTCONN at once, until the fixture unmounts.
    fs.kill()
    assert outcome(waiting, 5)[0] in ("ECONNABORTED", "ENOTCONN")
    assert stat(fs, d) == "ENOTCONN"
    assert fs.mountinfo() is not None


def test_a_hangfs_frozen_inside_a_request_makes_its_caller_unkillable(hung_fs):
    fs = hung_fs
    # The daemon stops itself while it holds this lookup.
    stuck = probe(fs, fs.mount / "hang")
    sb.wait_until("hangfs to stop in the request", lambda: proc_state(fs.pid) == "T", 10)
    stuck.kill()
    time.sleep(1)
    # SIGKILL did not end it: it waits, uninterruptibly now, for the answer.
    assert proc_state(stuck.pid) == "D"
    # Thawed, the daemon answers (no such file)...
    fs.thaw()
    assert stuck.wait(5) == -signal.SIGKILL
    # ...and killing it instead also frees such a waiter.
    stuck = probe(fs, fs.mount / "hang")
    sb.wait_until("hangfs to stop in the request", lambda: proc_state(fs.pid) == "T", 10)
    stuck.kill()
    time.sleep(0.5)
    assert proc_state(stuck.pid) == "D"
    fs.kill()
    assert stuck.wait(5) == -signal.SIGKILL


@pytest.mark.parametrize("hung_fs", [{"allow_other": True}], indirect=True)
def test_with_allow_other_root_reaches_hangfs_and_waits_when_it_is_frozen(hung_fs):
    fs, d = hung_fs, hung_fs.mount / "dir"
    assert "allow_other" in fs.mountinfo()
    assert stat(fs, d, user=False) == "ok"
    fs.freeze()
    waiting = probe(fs, d, user=False)
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.communicate(timeout=2)
    fs.kill()
    assert outcome(waiting, 5)[0] in ("ECONNABORTED", "ENOTCONN")
    assert stat(fs, d, user=False) == "ENOTCONN"
