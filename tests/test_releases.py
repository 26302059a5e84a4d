"""The plugin is built for the Slurm release the sandbox runs (scripts/test
--slurm V), says so, names its commit, and from Slurm 25.05 on exports
slurm_spank_init_failure_mode = ESPANK_JOB_FAILURE, so that a failing init
fails the job instead of draining the node."""
import re
import shutil
import subprocess

import pytest

import sandboxlib as sb

PLUGIN = sb.STATE / "lib" / "spank_dask.so"


def slurm_version() -> tuple[int, int, int]:
    out = sb.run(["sinfo", "-V"]).stdout.split()[1]
    return tuple(int(x) for x in out.split(".")[:3])


def header_enum(name: str) -> int | None:
    """The value of an ESPANK_* error from this release's slurm_errno.h."""
    text = open("/usr/include/slurm/slurm_errno.h").read()
    block = text[text.index("ESPANK_ERROR"):]
    value = None
    for line in block.splitlines():
        m = re.match(r"\s*(ESPANK_\w+)\s*(?:=\s*(\d+))?\s*,", line)
        if not m:
            if line.strip() and not line.strip().startswith("/*"):
                break
            continue
        value = int(m.group(2)) if m.group(2) else value + 1
        if m.group(1) == name:
            return value
    return None


def test_the_sandbox_runs_the_requested_release():
    v = slurm_version()
    assert f"{v[0]}.{v[1]:02d}" == sb.SLURM_RELEASE


def test_plugin_names_release_and_commit():
    v = ".".join(str(x) if i == 0 else f"{x:02d}" if i == 1 else str(x) for i, x in enumerate(slurm_version()))
    data = PLUGIN.read_bytes()
    assert f"built for Slurm {v}".encode() in data
    head = subprocess.run(["git", "-C", str(sb.REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    log = (sb.LOGS / "slurmd-n1.log").read_text()
    loads = [l for l in log.splitlines() if "dask-spank plugin" in l and "loaded" in l]
    assert loads and f"built for Slurm {v}, commit " in loads[-1], loads[-1:]
    if head.returncode == 0:
        assert head.stdout.strip() in loads[-1], loads[-1]
        out = sb.run([str(sb.BIN / "dask-node-agent"), "--version"]).stdout
        assert head.stdout.strip() in out, out
        out = sb.run([str(sb.BIN / "dask-spank"), "--version"]).stdout
        assert head.stdout.strip() in out, out


def exported_int(so, symbol: str) -> int | None:
    """The 4-byte value of an exported data symbol of a shared object."""
    nm = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    addr = next((int(l.split()[0], 16) for l in nm.splitlines() if l.split()[-1] == symbol), None)
    if addr is None:
        return None
    dump = subprocess.run(["objdump", "-s", f"--start-address={addr:#x}", f"--stop-address={addr + 4:#x}", str(so)],
                          capture_output=True, text=True, check=True).stdout
    line = next(l for l in dump.splitlines() if re.match(rf"\s*0*{addr:x}\s", l))
    return int.from_bytes(bytes.fromhex("".join(line.split()[1:2])), "little")


@pytest.mark.skipif(not shutil.which("nm") or not shutil.which("objdump"), reason="binutils missing")
def test_init_failure_mode_is_job_failure_from_25_05():
    value = exported_int(PLUGIN, "slurm_spank_init_failure_mode")
    if slurm_version() >= (25, 5, 0):
        want = header_enum("ESPANK_JOB_FAILURE")
        assert want is not None and want != header_enum("ESPANK_NODE_FAILURE")
        assert value == want, (value, want)
    else:
        assert header_enum("ESPANK_JOB_FAILURE") is None
        assert value is None
