"""The RPMs of one Slurm release (the sandbox's, scripts/test --slurm V):
an SRPM made by scripts/package from a commit, rebuilt here with no network
and an empty CARGO_HOME, inspected with rpm, and its payload run for real on
the sandbox. Then two commits packaged and compared."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import sandboxlib as sb


def slurm_version() -> str:
    return sb.run(["sinfo", "-V"]).stdout.split()[1]


def rebuild_offline(srpm: str, top) -> list[str]:
    """rpmbuild --rebuild in a network namespace of its own, CARGO_HOME empty."""
    shutil.rmtree(top, ignore_errors=True)
    (top / "cargo-home").mkdir(parents=True)
    p = subprocess.run(
        ["unshare", "--net", "--", "env", f"CARGO_HOME={top / 'cargo-home'}",
         "rpmbuild", "--rebuild", "--nodeps", "--define", f"_topdir {top}",
         "--define", "_build_id_links none", "--define", "debug_package %{nil}",
         "--define", "_rpmformat 4", srpm],
        capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not os.listdir(top / "cargo-home")
    return sorted(str(f) for f in (top / "RPMS").rglob("*.rpm"))


def package(*args) -> list[str]:
    p = subprocess.run([str(sb.REPO / "scripts" / "package"), *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return [l for l in p.stdout.splitlines() if l.endswith(".rpm")]


@pytest.fixture(scope="module")
def srpm():
    out = package("--srpm", str(sb.STATE / "rpm"))
    assert len(out) == 1 and out[0].endswith(".src.rpm"), out
    return out[0]


@pytest.fixture(scope="module")
def rpms(srpm):
    """The binary RPMs, rebuilt from the SRPM alone, offline."""
    built = rebuild_offline(srpm, sb.STATE / "rpm-rebuild")
    byname = {rpmq(f, "--qf", "%{NAME}"): f for f in built}
    assert set(byname) == {"dask-spank", "dask-spank-agent"}, built
    return byname


def rpmq(rpm_file, *args) -> str:
    return subprocess.run(["rpm", "-qp", *args, rpm_file], capture_output=True, text=True, check=True).stdout


def unpack(rpm_files, d):
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for f in rpm_files:
        subprocess.run(f"rpm2cpio '{f}' | cpio -idm --quiet", shell=True, cwd=d, check=True)
    os.chmod(d, 0o755)
    return d


@pytest.fixture(scope="module")
def payload(rpms):
    return unpack(rpms.values(), sb.STATE / "payload")


def test_packages_are_format_v4(srpm, rpms):
    """rpm 6 (Debian sid) writes v6 packages by default, which the rpm of
    EL8/EL9 cannot read. Older rpm does not know the tag: nothing to check."""
    for f in [srpm, *rpms.values()]:
        p = subprocess.run(["rpm", "-qp", "--qf", "%{RPMFORMAT}", f], capture_output=True, text=True)
        if "unknown tag" in p.stderr:
            pytest.skip(f"this rpm ({subprocess.run(['rpm', '--version'], capture_output=True, text=True).stdout.strip()}) has no RPMFORMAT tag")
        assert p.stdout == "4", (f, p.stdout, p.stderr)


def test_srpm_carries_the_source_and_its_crates(srpm):
    files = set(rpmq(srpm, "-l").split())
    assert files == {"dask-spank.spec", "dask-spank-0.1.0.tar.gz", "dask-spank-0.1.0-vendor.tar.gz"}, files
    assert rpmq(srpm, "--qf", "%{RELEASE}") == f"1.slurm{slurm_version()}"


def test_file_lists(rpms):
    assert set(rpmq(rpms["dask-spank"], "-l").split()) == {
        "/etc/slurm/plugstack.conf.d",
        "/etc/slurm/plugstack.conf.d/dask-spank.conf",
        "/usr/bin/dask-spank",
        "/usr/lib64/slurm/spank_dask.so",
        "/usr/share/doc/dask-spank",
        "/usr/share/doc/dask-spank/README.md",
        "/usr/share/doc/dask-spank/admin.md",
        "/usr/share/doc/dask-spank/user.md",
        "/usr/share/doc/dask-spank/examples",
        "/usr/share/doc/dask-spank/examples/cc-in2p3.conf",
        "/usr/share/licenses/dask-spank",
        "/usr/share/licenses/dask-spank/LICENSE",
    }
    assert set(rpmq(rpms["dask-spank-agent"], "-l").split()) == {
        "/usr/lib/systemd/system/dask-node-agent.service",
        "/usr/libexec/dask-spank",
        "/usr/libexec/dask-spank/health",
        "/usr/sbin/dask-node-agent",
    }


def test_tied_to_the_slurm_release(rpms):
    full = slurm_version()
    major = ".".join(full.split(".")[:2])
    nxt = f"{major.split('.')[0]}.{int(major.split('.')[1]) + 1:02d}"
    for rpm in rpms.values():
        assert rpmq(rpm, "--qf", "%{RELEASE}") == f"1.slurm{full}"
    plugin = rpmq(rpms["dask-spank"], "--requires").splitlines()
    agent = rpmq(rpms["dask-spank-agent"], "--requires").splitlines()
    assert f"(slurm >= {major} with slurm < {nxt})" in plugin, plugin
    assert not [r for r in plugin if "slurmd" in r], plugin  # login nodes run no slurmd
    assert f"(slurm-slurmd >= {major} with slurm-slurmd < {nxt})" in agent, agent
    assert f"dask-spank = 0.1.0-1.slurm{full}" in agent, agent
    # Every Slurm version named is this release's.
    for r in plugin + agent:
        if "slurm" in r:
            for v in re.findall(r"(?<![\d.])(\d+\.\d+)(?:\.\d+)*", r.replace("0.1.0-1.", "")):
                assert v in (major, nxt), r


def test_config_flags_and_scriptlets(rpms):
    rpm = rpms["dask-spank"]
    flags = dict(l.rsplit(" ", 1) if " " in l else (l, "") for l in
                 rpmq(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines())
    assert flags["/etc/slurm/plugstack.conf.d/dask-spank.conf"] == "cn", "config(noreplace)"
    assert rpmq(rpm, "--configfiles").split() == ["/etc/slurm/plugstack.conf.d/dask-spank.conf"]
    assert rpmq(rpm, "--scripts").strip() == ""
    scripts = rpmq(rpms["dask-spank-agent"], "--scripts")
    assert "systemctl --no-reload preset dask-node-agent.service" in scripts
    assert "systemctl --no-reload disable --now dask-node-agent.service" in scripts
    assert "systemctl try-restart dask-node-agent.service" in scripts


def test_snippet_is_inactive_and_the_example_policy_is_shipped(payload):
    snippet = (payload / "etc/slurm/plugstack.conf.d/dask-spank.conf").read_text()
    lines = [l for l in snippet.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert lines == [], lines
    assert "#required /usr/lib64/slurm/spank_dask.so" in snippet
    example = (payload / "usr/share/doc/dask-spank/examples/cc-in2p3.conf").read_text()
    line = [l for l in example.splitlines() if l.startswith("required ")]
    assert len(line) == 1 and line[0].startswith("required /usr/lib64/slurm/spank_dask.so ")
    assert "worker_partition=htc" in line[0] and "worker_licenses=sps" in line[0]


def rpm_root(root: Path, *args: str) -> subprocess.CompletedProcess:
    """rpm on a scratch root of its own (its own database): no scriptlets,
    no dependencies (Slurm is not installed there)."""
    return subprocess.run(["rpm", "--root", str(root), "--nodeps", "--noscripts", "--nosignature", *args],
                          capture_output=True, text=True)


def test_install_edit_upgrade_and_remove_leave_no_line_naming_a_missing_plugin(rpms):
    """As rpm does it on a node: the snippet installs inactive, the admin
    enables it in place, an upgrade keeps the edit, and removal sets the
    edited file aside where slurmd does not read it (plugstack.conf
    includes *.conf), together with the plugin."""
    root = sb.STATE / "rpm-root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    assert subprocess.run(["rpm", "--root", str(root), "--initdb"]).returncode == 0
    both = [rpms["dask-spank"], rpms["dask-spank-agent"]]
    p = rpm_root(root, "-i", *both)
    assert p.returncode == 0, p.stderr
    d = root / "etc/slurm/plugstack.conf.d"
    snippet = d / "dask-spank.conf"
    active = lambda: [l for f in d.glob("*.conf") for l in f.read_text().splitlines()  # noqa: E731
                      if l.strip() and not l.lstrip().startswith("#")]
    assert active() == [], "installed inactive"
    # The admin enables it in place.
    snippet.write_text(snippet.read_text().replace("#required /usr/lib64/slurm/spank_dask.so",
                                                   "required /usr/lib64/slurm/spank_dask.so tls=required"))
    assert active() == ["required /usr/lib64/slurm/spank_dask.so tls=required"]
    # An upgrade (the same packages again) keeps the edit.
    p = rpm_root(root, "-U", "--replacepkgs", *both)
    assert p.returncode == 0, p.stderr
    assert active() == ["required /usr/lib64/slurm/spank_dask.so tls=required"]
    # Removal: the plugin goes, and no included file names it any more.
    p = rpm_root(root, "-e", "dask-spank-agent", "dask-spank")
    assert p.returncode == 0, p.stderr
    assert not (root / "usr/lib64/slurm/spank_dask.so").exists()
    assert active() == [], [f.name for f in d.iterdir()]
    saved = d / "dask-spank.conf.rpmsave"
    assert "required /usr/lib64/slurm/spank_dask.so tls=required" in saved.read_text(), "the admin's policy is kept"


def test_the_health_check_program_runs_the_agents_check(payload, tmp_path):
    """/usr/libexec/dask-spank/health, run as slurmd runs it (no argument,
    SLURMD_NODENAME set), with the payload's agent binary where the
    package puts it: it answers for the sandbox's running agent."""
    shipped = (payload / "usr/libexec/dask-spank/health")
    assert os.access(shipped, os.X_OK)
    wrapper = tmp_path / "health"
    wrapper.write_text(shipped.read_text().replace("/usr/sbin/dask-node-agent",
                                                   str(payload / "usr/sbin/dask-node-agent")))
    wrapper.chmod(0o755)
    env = {**sb.ENV, "SLURMD_NODENAME": "n1", "DASK_SPANK_AGENT_DIR": str(sb.STATE / "run" / "agent")}
    p = subprocess.run([str(wrapper)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    # And fails, saying why, where no agent answers (a node it would drain:
    # n1 is not drained by this, the agent directory is the wrong one for
    # n9, which Slurm does not know).
    env.update(SLURMD_NODENAME="n9")
    p = subprocess.run([str(wrapper)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "dask-node-agent:" in p.stderr, p.stdout + p.stderr


def test_unit(payload):
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


def enable_snippet(payload) -> Path:
    """What the snippet's header tells an admin to do: uncomment its line
    (here also pointed at the sandbox's install path and agent directory),
    in the included directory. plugstack.conf then holds only
    `include <dir>/*.conf`."""
    d = sb.STATE / "etc" / "plugstack.conf.d"
    d.mkdir(exist_ok=True)
    text = (payload / "etc/slurm/plugstack.conf.d/dask-spank.conf").read_text()
    lib = "/usr/lib64/slurm/spank_dask.so"
    assert f"#required {lib}\n" in text
    text = text.replace(f"#required {lib}", f"required {sb.STATE / 'lib/spank_dask.so'} "
                        f"agent_dir={sb.STATE / 'run/agent'} attach_cmd={sb.BIN / 'dask-spank'}")
    (d / "dask-spank.conf").write_text(text)
    (sb.STATE / "etc" / "plugstack.include").write_text(f"{d}\n")
    return d


def test_payload_runs_a_dask_cluster(payload):
    """The packaged binaries, enabled through the packaged snippet as a
    site does it: a bare line (site-neutral policy) in an included file."""
    import dask.array as da

    os.environ["DASK_SPANK_PAYLOAD"] = str(payload)
    snippets = enable_snippet(payload)
    try:
        sb.sandbox("up")
        conf = (sb.STATE / "etc" / "plugstack.conf").read_text()
        assert conf == f"include {snippets}/*.conf\n", conf
        for installed, shipped in [
            (sb.STATE / "lib/spank_dask.so", payload / "usr/lib64/slurm/spank_dask.so"),
            (sb.BIN / "dask-node-agent", payload / "usr/sbin/dask-node-agent"),
            (sb.BIN / "dask-spank", payload / "usr/bin/dask-spank"),
        ]:
            assert installed.read_bytes() == shipped.read_bytes(), installed
        out = sb.run([str(payload / "usr/sbin/dask-node-agent"), "check", "--agent-dir",
                      str(sb.STATE / "run" / "agent"), "--node", "n1"]).stdout
        assert "answers" in out
        log = (sb.LOGS / "slurmd-n1.log").read_text().splitlines()
        assert f"built for Slurm {slurm_version()}, commit " in [l for l in log if "dask-spank plugin" in l][-1]
        name = "rpm-payload"
        sb.forget_cluster(name)
        sched = sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}")
        arr = sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2")
        sb.wait_scheduler_file(name)
        c = sb.client(name)
        c.wait_for_workers(2, timeout=120)
        assert int(da.arange(10_000, chunks=1000).sum().compute()) == 49_995_000
        # The site-neutral snippet line sets no partition: Slurm's default.
        assert sb.scontrol_job(sched)["Partition"] == "htc"
        c.close()
        sb.run(["scancel", sched, arr])
        sb.wait_job_gone(sched)
        sb.wait_job_gone(arr)
    finally:
        del os.environ["DASK_SPANK_PAYLOAD"]
        (sb.STATE / "etc" / "plugstack.include").unlink()
        sb.sandbox("up")  # back to the build tree's binaries and policy line


def commits_with_packaging(n: int) -> list[str]:
    """The newest n commits whose tree has the offline packaging (COMMIT,
    vendored crates)."""
    out = subprocess.run(["git", "-C", str(sb.REPO), "log", "--format=%H", "-n", "40", "HEAD"],
                         capture_output=True, text=True).stdout.split()

    def offline(c):
        spec = subprocess.run(["git", "-C", str(sb.REPO), "show", f"{c}:packaging/dask-spank.spec"],
                              capture_output=True, text=True).stdout
        has_commit = subprocess.run(["git", "-C", str(sb.REPO), "cat-file", "-e", f"{c}:COMMIT"],
                                    capture_output=True).returncode == 0
        return has_commit and "--offline" in spec
    return [c for c in out if offline(c)][:n]


def test_two_build_directories_give_identical_binaries(srpm, rpms, tmp_path):
    """The SRPM rebuilt in another directory (another _topdir, so another
    build path) gives bit-identical binaries: no build path is embedded."""
    again = rebuild_offline(srpm, sb.STATE / "rpm-rebuild-elsewhere")
    byname = {rpmq(f, "--qf", "%{NAME}"): f for f in again}
    first = unpack(rpms.values(), tmp_path / "first")
    second = unpack(byname.values(), tmp_path / "second")
    for f in ("usr/lib64/slurm/spank_dask.so", "usr/sbin/dask-node-agent", "usr/bin/dask-spank"):
        a, b = (first / f).read_bytes(), (second / f).read_bytes()
        assert a == b, f"{f} differs between two build directories"
        assert b"rpm-rebuild" not in a, f"{f} holds a build path"


def test_two_commits_package_their_own_code(payload):
    """A second commit, packaged after HEAD, ships its own binaries: each
    names its commit in --version, and the plugin names it too."""
    commits = commits_with_packaging(2)
    if len(commits) < 2:
        pytest.skip("fewer than two commits with the packaging in this checkout")
    head, older = commits
    out = package("--commit", older, str(sb.STATE / "rpm-older"))
    older_payload = unpack([f for f in out if not f.endswith(".src.rpm")], sb.STATE / "payload-older")
    for d, commit in [(payload, head), (older_payload, older)]:
        for b in ("usr/bin/dask-spank", "usr/sbin/dask-node-agent"):
            v = subprocess.run([str(d / b), "--version"], capture_output=True, text=True, check=True).stdout
            assert f"(commit {commit})" in v, (b, v, commit)
        assert commit.encode() in (d / "usr/lib64/slurm/spank_dask.so").read_bytes()
    assert (payload / "usr/bin/dask-spank").read_bytes() != (older_payload / "usr/bin/dask-spank").read_bytes()
