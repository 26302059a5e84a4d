"""Did a root process of ours open a user's file? Seen from outside.

`RootOpens(path, suspects)` watches the file behind `path` (a symlink is
followed: for a link to /dev/zero, /dev/zero is watched) while a test
runs. `root_openers()` then lists the processes that opened it with an
effective or file-system user id 0 and are one of `suspects` (pids) or
their descendants, or run a program named in `SUSPECT_PROGRAMS`.

Two ways of seeing, by the kind of file:
* a regular file: fanotify open permission events. The kernel stops each
  opener until this watcher has read its user ids and ancestry and let it
  go; nothing escapes, however short-lived (one quick open and read
  between two samples of /proc would).
* a FIFO or a device: this kernel (6.x) sends no fanotify events for
  them, so the suspects' processes are sampled every 50 ms: a descriptor
  on the file, or a thread blocked opening a FIFO (`wait_for_partner`:
  with no writer, such an open never ends, so a sample cannot miss it).

Needs root (fanotify needs CAP_SYS_ADMIN). Pure ctypes over libc.
"""
from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from pathlib import Path

FAN_CLOEXEC = 0x01
FAN_CLASS_CONTENT = 0x08
FAN_MARK_ADD = 0x01
FAN_OPEN_PERM = 0x10000
FAN_ALLOW = 0x01
AT_FDCWD = -100
# struct fanotify_event_metadata: u32 event_len, u8 vers, u8 reserved,
# u16 metadata_len, u64 mask, s32 fd, s32 pid.
EVENT = struct.Struct("=IBBHQii")
SAMPLE_EVERY_S = 0.05

# Root processes of Slurm's that must not open a user's file either.
SUSPECT_PROGRAMS = {"slurmstepd", "slurmd", "dask-node-agent"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


def proc_status(pid: int | str) -> dict[str, str]:
    """/proc/<pid>/status as a dict. Read as bytes: its Name line is the
    process's own choice, and need not be UTF-8 (a text read would fail
    and hide that process)."""
    out = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f.read().decode(errors="replace").splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _ancestry(pid: int) -> list[int]:
    chain = []
    while pid > 1 and len(chain) < 64:
        chain.append(pid)
        try:
            pid = int(proc_status(pid)["PPid"])
        except (OSError, KeyError, ValueError):
            break
    return chain


def _describe(pid: int, st: dict[str, str], **seen) -> dict:
    return {"pid": pid, "name": st["Name"], "uids": [int(u) for u in st["Uid"].split()],
            "ancestry": _ancestry(pid), **seen}


class RootOpens:
    def __init__(self, path: Path, suspects: list[int]):
        self.path = Path(path)
        self.suspects = set(suspects)
        self.events: list[dict] = []
        self.errors: list[str] = []
        target = os.stat(self.path)
        self._key = (target.st_dev, target.st_ino)
        self._regular = self.path.resolve().is_file()

    def __enter__(self):
        self._stop_r, self._stop_w = os.pipe()
        self._fd = self._fanotify() if self._regular else None
        self._thread = threading.Thread(target=self._serve if self._regular else self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        # Closing the group lets any opener still waiting go (the kernel
        # allows what nobody answers once the group is gone).
        for fd in (self._fd, self._stop_r, self._stop_w):
            if fd is not None:
                os.close(fd)

    def root_openers(self) -> list[dict]:
        """Openers that had root's effective or file-system user id and
        belong to the suspects."""
        return [e for e in self.events
                if (e["uids"][1] == 0 or e["uids"][3] == 0)
                and (self.suspects & set(e["ancestry"]) or e["name"] in SUSPECT_PROGRAMS)]

    # -- regular files: the kernel's permission events ----------------------

    def _fanotify(self) -> int:
        fd = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY | os.O_LARGEFILE)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init (needs CAP_SYS_ADMIN)")
        if _libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, os.fsencode(self.path)) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"fanotify_mark {self.path}")
        return fd

    def _serve(self):
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            buf = os.read(self._fd, 4096)
            off = 0
            while off + EVENT.size <= len(buf):
                length, _vers, _r, _ml, _mask, efd, pid = EVENT.unpack_from(buf, off)
                try:
                    self.events.append(_describe(pid, proc_status(pid), how="open"))
                except (OSError, KeyError, ValueError) as e:
                    self.errors.append(f"pid {pid}: {e!r}")
                # Let it go, then drop our copy of its descriptor.
                os.write(self._fd, struct.pack("=iI", efd, FAN_ALLOW))
                os.close(efd)
                off += length

    # -- FIFOs and devices: samples of the suspects' processes --------------

    def _sample(self):
        seen: set[tuple[int, str]] = set()
        while not select.select([self._stop_r], [], [], SAMPLE_EVERY_S)[0]:
            for pid in self._suspect_pids():
                try:
                    st = proc_status(pid)
                    how = self._holds(pid)
                    if how and (pid, how) not in seen:
                        seen.add((pid, how))
                        self.events.append(_describe(pid, st, how=how))
                except (OSError, KeyError, ValueError):
                    continue  # it ended meanwhile

    def _suspect_pids(self) -> list[int]:
        parents, names = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    st = proc_status(entry)
                    parents[int(entry)], names[int(entry)] = int(st["PPid"]), st["Name"]
                except (OSError, KeyError, ValueError):
                    continue
        out = []
        for pid in parents:
            p, hops = pid, 0
            while p > 1 and hops < 64 and p not in self.suspects and names.get(p) not in SUSPECT_PROGRAMS:
                p, hops = parents.get(p, 0), hops + 1
            if p in self.suspects or names.get(p) in SUSPECT_PROGRAMS:
                out.append(pid)
        return out

    def _holds(self, pid: int) -> str | None:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                s = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == self._key:
                return f"descriptor {fd}"
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                if Path(f"/proc/{pid}/task/{tid}/wchan").read_text() == "wait_for_partner":
                    return f"thread {tid} opening a FIFO"
            except OSError:
                continue
        return None
