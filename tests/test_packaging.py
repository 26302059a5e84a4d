"""The RPM: built from a clean tree by scripts/package, inspected with rpm,
and its payload run for real on the sandbox."""
import os
import shutil
import subprocess

import pytest

import sandboxlib as sb

SLURM = "22.05.8"


@pytest.fixture(scope="module")
def rpm_file():
    p = subprocess.run([str(sb.REPO / "scripts" / "package")], capture_output=True, text=True, check=True)
    path = p.stdout.strip().splitlines()[-1]
    assert path.endswith(".rpm") and os.path.exists(path), p.stdout + p.stderr
    return path


def rpmq(rpm_file, *args) -> str:
    return subprocess.run(["rpm", "-qp", *args, rpm_file], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def payload(rpm_file):
    d = sb.STATE / "payload"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    subprocess.run(f"rpm2cpio '{rpm_file}' | cpio -idm --quiet", shell=True, cwd=d, check=True)
    os.chmod(d, 0o755)
    return d


def test_file_list(rpm_file):
    files = set(rpmq(rpm_file, "-l").split())
    assert files == {
        "/etc/slurm/plugstack.conf.d",
        "/etc/slurm/plugstack.conf.d/dask-spank.conf",
        "/usr/bin/dask-spank",
        "/usr/lib/systemd/system/dask-node-agent.service",
        "/usr/lib64/slurm/spank_dask.so",
        "/usr/sbin/dask-node-agent",
        "/usr/share/doc/dask-spank",
        "/usr/share/doc/dask-spank/README.md",
        "/usr/share/doc/dask-spank/admin.md",
        "/usr/share/doc/dask-spank/user.md",
        "/usr/share/licenses/dask-spank",
        "/usr/share/licenses/dask-spank/LICENSE",
    }


def test_tied_to_the_slurm_release(rpm_file):
    assert rpmq(rpm_file, "--qf", "%{RELEASE}") == f"1.slurm{SLURM}"
    requires = rpmq(rpm_file, "--requires").splitlines()
    assert "(slurm >= 22.05 with slurm < 22.06)" in requires
    assert "slurm-slurmd" in requires


def test_config_flags_and_scriptlets(rpm_file):
    flags = dict(l.rsplit(" ", 1) if " " in l else (l, "") for l in
                 rpmq(rpm_file, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines())
    assert flags["/etc/slurm/plugstack.conf.d/dask-spank.conf"] == "cn", "config(noreplace)"
    assert rpmq(rpm_file, "--configfiles").split() == ["/etc/slurm/plugstack.conf.d/dask-spank.conf"]
    scripts = rpmq(rpm_file, "--scripts")
    assert "systemctl --no-reload preset dask-node-agent.service" in scripts
    assert "systemctl --no-reload disable --now dask-node-agent.service" in scripts
    assert "systemctl try-restart dask-node-agent.service" in scripts


def test_snippet_and_unit(payload):
    snippet = (payload / "etc/slurm/plugstack.conf.d/dask-spank.conf").read_text()
    assert "required /usr/lib64/slurm/spank_dask.so" in snippet
    unit = (payload / "usr/lib/systemd/system/dask-node-agent.service").read_text()
    assert "Type=notify" in unit and "Restart=on-failure" in unit and "WatchdogSec=" in unit
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # Verify the unit as shipped, with ExecStart pointed at the payload's binary.
    d = sb.STATE / "unit-verify"
    d.mkdir(exist_ok=True)
    (d / "dask-node-agent.service").write_text(
        unit.replace("/usr/sbin/dask-node-agent", str(payload / "usr/sbin/dask-node-agent")))
    p = subprocess.run(["systemd-analyze", "verify", str(d / "dask-node-agent.service")],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "dask-node-agent.service" not in p.stderr, p.stderr


def test_payload_runs_a_dask_cluster(payload):
    import dask.array as da

    os.environ["DASK_SPANK_PAYLOAD"] = str(payload)
    try:
        sb.sandbox("up")
        for installed, shipped in [
            (sb.STATE / "lib/spank_dask.so", payload / "usr/lib64/slurm/spank_dask.so"),
            (sb.BIN / "dask-node-agent", payload / "usr/sbin/dask-node-agent"),
            (sb.BIN / "dask-spank", payload / "usr/bin/dask-spank"),
        ]:
            assert installed.read_bytes() == shipped.read_bytes(), installed
        out = sb.run([str(payload / "usr/sbin/dask-node-agent"), "check", "--agent-dir",
                      str(sb.STATE / "run" / "agent"), "--node", "n1"]).stdout
        assert "answers" in out
        name = "rpm-payload"
        sb.forget_cluster(name)
        sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}")
        arr = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2")
        sb.wait_scheduler_file(name)
        c = sb.client(name)
        c.wait_for_workers(2, timeout=120)
        assert int(da.arange(10_000, chunks=1000).sum().compute()) == 49_995_000
        c.close()
        sb.run(["scancel", sched, arr])
        sb.wait_job_gone(sched)
        sb.wait_job_gone(arr)
    finally:
        del os.environ["DASK_SPANK_PAYLOAD"]
        sb.sandbox("up")  # back to the build tree's binaries
