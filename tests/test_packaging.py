"""The RPMs of one Slurm release (the sandbox's, scripts/test --slurm V):
an SRPM made by scripts/package from a commit, rebuilt here with no network,
an empty CARGO_HOME and EL's debug macros, inspected with rpm, and its
payload run for real on the sandbox. The wheel made beside it, installed in a
fresh venv. Then two commits packaged and compared."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
from pathlib import Path

import pytest

import sandboxlib as sb


def slurm_version() -> str:
    return sb.run(["sinfo", "-V"]).stdout.split()[1]


def el_debug_macros() -> list[str]:
    """EL's debug macros, as scripts/package loads them: rpm older than 4.20
    also needs EL's %install hook (packaging/el-debug.macros says why)."""
    args = ["--load", str(sb.REPO / "packaging" / "el-debug.macros")]
    version = subprocess.run(["rpm", "--version"], capture_output=True, text=True, check=True).stdout.split()[2]
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (4, 20):
        args += ["--load", str(sb.REPO / "packaging" / "el-debug-install.macros")]
    return args


def rebuild_offline(srpm: str, top) -> list[str]:
    """rpmbuild --rebuild in a network namespace of its own, CARGO_HOME
    empty, with EL's debug macros (debuginfo and debugsource packages, as
    scripts/package builds)."""
    shutil.rmtree(top, ignore_errors=True)
    (top / "cargo-home").mkdir(parents=True)
    p = subprocess.run(
        ["unshare", "--net", "--", "env", f"CARGO_HOME={top / 'cargo-home'}",
         "rpmbuild", "--rebuild", "--nodeps", "--define", f"_topdir {top}",
         *el_debug_macros(), "--define", "_build_id_links none", "--define", "_rpmformat 4", srpm],
        capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not os.listdir(top / "cargo-home")
    return sorted(str(f) for f in (top / "RPMS").rglob("*.rpm"))


def package(*args, suffix=".rpm") -> list[str]:
    p = subprocess.run([str(sb.REPO / "scripts" / "package"), *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return [l for l in p.stdout.splitlines() if l.endswith(suffix)]


@pytest.fixture(scope="module")
def made():
    """scripts/package --srpm: the SRPM and the wheel."""
    shutil.rmtree(sb.STATE / "rpm", ignore_errors=True)
    out = package("--srpm", str(sb.STATE / "rpm"), suffix="")
    assert len(out) == 2 and out[0].endswith(".src.rpm") and out[1].endswith(".whl"), out
    return out


@pytest.fixture(scope="module")
def srpm(made):
    return made[0]


@pytest.fixture(scope="module")
def rpms(srpm):
    """The binary RPMs, rebuilt from the SRPM alone, offline, with EL's
    debug macros."""
    built = rebuild_offline(srpm, sb.STATE / "rpm-rebuild")
    byname = {rpmq(f, "--qf", "%{NAME}"): f for f in built}
    assert set(byname) == {"dask-spank", "dask-spank-agent", "python3-dask-spank",
                           "dask-spank-debuginfo", "dask-spank-debugsource"}, built
    return byname


BINARIES = ("usr/lib64/slurm/spank_dask.so", "usr/sbin/dask-node-agent", "usr/bin/dask-spank")


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


@pytest.fixture(scope="module")
def vendor(srpm):
    """The SRPM's vendored crates: {directory: {file: bytes}} (Source1)."""
    d = sb.STATE / "srpm-sources"
    unpack([srpm], d)
    crates: dict[str, dict[str, bytes]] = {}
    with tarfile.open(d / "dask-spank-0.1.0-vendor.tar.gz") as t:
        for m in t:
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 3 and parts[0] == "vendor":
                crates.setdefault(parts[1], {})["/".join(parts[2:])] = t.extractfile(m).read()
    assert len(crates) > 100, sorted(crates)
    return crates


STUB_FILES = {"Cargo.toml", ".cargo-checksum.json", "src/lib.rs"}


def is_stub(files: dict[str, bytes]) -> bool:
    return set(files) == STUB_FILES and b"pruned by scripts/package" in files["src/lib.rs"] \
        and files["src/lib.rs"].count(b"\n") == 1


def crate_manifest(files: dict[str, bytes]) -> dict:
    return tomllib.loads(files["Cargo.toml"].decode())["package"]


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
    assert files == {"dask-spank.spec", "dask-spank-0.1.0.tar.gz", "dask-spank-0.1.0-vendor.tar.gz",
                     "dask-spank-0.1.0-bundled.inc"}, files
    assert rpmq(srpm, "--qf", "%{RELEASE}") == f"1.slurm{slurm_version()}"


def test_debuginfo_and_debugsource_are_not_empty(rpms):
    """EL's debug macros: find-debuginfo moved the line tables of the three
    binaries into -debuginfo, and -debugsource holds the sources they name
    (the crates' own and the vendored ones), where the debug info says."""
    debug = rpmq(rpms["dask-spank-debuginfo"], "--qf", "[%{FILENAMES} %{FILESIZES}\n]").splitlines()
    debug = {f: int(n) for f, n in (l.rsplit(" ", 1) for l in debug)}
    for b in BINARIES:
        files = [f for f in debug if f.startswith(f"/usr/lib/debug/{b}") and f.endswith(".debug")]
        assert len(files) == 1 and debug[files[0]] > 10_000, (b, sorted(debug))
    release = rpmq(rpms["dask-spank"], "--qf", "%{VERSION}-%{RELEASE}.%{ARCH}")
    src = set(rpmq(rpms["dask-spank-debugsource"], "-l").split())
    base = f"/usr/src/debug/dask-spank-{release}"
    for f in ("cli/src/main.rs", "node-agent/src/main.rs", "spank-plugin/src/lib.rs", "common/src/lib.rs",
              "vendor/serde_json/src/de.rs"):
        assert f"{base}/{f}" in src, (f, sorted(src)[:20])
    # The stripped binaries point at their debug files.
    p = subprocess.run(["readelf", "-S", "--wide", str(unpack([rpms["dask-spank"]], sb.STATE / "stripped")
                                                       / "usr/bin/dask-spank")], capture_output=True, text=True)
    assert ".gnu_debuglink" in p.stdout and ".debug_line" not in p.stdout, p.stdout


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


def libslurm_soname() -> str:
    """The soname of the libslurm of the headers the package was built
    against (the sandbox's release)."""
    lib = subprocess.run(["clang", "-print-file-name=libslurm.so"], capture_output=True, text=True,
                         check=True).stdout.strip()
    out = subprocess.run(["objdump", "-p", lib], capture_output=True, text=True, check=True).stdout
    return re.search(r"^\s*SONAME\s+(\S+)$", out, re.M).group(1)


def test_tied_to_the_slurm_release(rpms):
    """Requires names files and sonames that every Slurm packaging ships
    (SchedMD's, OpenHPC's, EPEL's name their packages differently): the
    libslurm soname of this release (a new one every release), and
    slurmd for the agent. No package name of Slurm's."""
    full = slurm_version()
    for rpm in rpms.values():
        assert rpmq(rpm, "--qf", "%{RELEASE}") == f"1.slurm{full}"
    soname = libslurm_soname()
    assert re.fullmatch(r"libslurm\.so\.\d+", soname), soname
    plugin = rpmq(rpms["dask-spank"], "--requires").splitlines()
    agent = rpmq(rpms["dask-spank-agent"], "--requires").splitlines()
    assert f"{soname}()(64bit)" in plugin, plugin
    assert not [r for r in plugin if "slurmd" in r], plugin  # login nodes run no slurmd
    assert "/usr/sbin/slurmd" in agent, agent
    assert f"dask-spank = 0.1.0-1.slurm{full}" in agent, agent
    for r in plugin + agent:
        assert not re.match(r"\(?slurm[\w-]*( |$)", r), r
    # Built on Debian bookworm or later: glibc 2.34 or later (no EL8).
    glibc = [tuple(map(int, v.split("."))) for r in plugin + agent
             for v in re.findall(r"GLIBC_(\d+\.\d+)", r)]
    assert glibc and max(glibc) >= (2, 34), plugin


def test_python_subpackage_is_noarch_and_holds_dask_spank(rpms):
    rpm = rpms["python3-dask-spank"]
    assert rpmq(rpm, "--qf", "%{ARCH}") == "noarch"
    files = rpmq(rpm, "-l").split()
    py = rpmq(rpm, "--requires").splitlines()
    abi = {r for r in py if r.startswith("python(abi) = ")}
    assert len(abi) == 1, py
    site = f"/usr/lib/python{abi.pop().split()[-1]}/site-packages"
    for f in ("dask_spank/__init__.py", "dask_spank/cluster.py", "dask_spank/boot.py",
              "dask_spank-0.1.0.dist-info/METADATA"):
        assert f"{site}/{f}" in files, (f, files)
    assert "/usr/etc/jupyter/jupyter_server_config.d/dask_spank.json" in files
    assert not [f for f in files if f.endswith((".so", ".debug")) or "/slurm" in f], files


def test_wheel_installs_in_a_fresh_venv_and_imports(made, tmp_path):
    """The wheel beside the SRPM, for users' own environments: installed
    with no index and no dependencies in a venv of its own; distributed
    (which it needs to import) comes from the tests' venv, after the fresh
    venv's site-packages (a .pth), so dask_spank is the wheel's."""
    wheel = Path(made[1])
    assert wheel.name == "dask_spank-0.1.0-py3-none-any.whl", wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    p = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                        "--no-index", "--no-deps", str(wheel)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    site = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([str(venv / "bin/python"), "-c",
                        "import dask_spank; print(dask_spank.__file__, dask_spank.__version__, dask_spank.SpankCluster)"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{site}/dask_spank/__init__.py 0.1.0 "), p.stdout
    assert (venv / "etc/jupyter/jupyter_server_config.d/dask_spank.json").exists()


def test_bundled_crates_and_licence(rpms, vendor):
    """One Provides: bundled(crate(NAME)) = VERSION per vendored crate with
    sources (the stubs are never built), and a License that names every
    licence of theirs."""
    real = {d: f for d, f in vendor.items() if not is_stub(f)}
    provides = [l for l in rpmq(rpms["dask-spank"], "--provides").splitlines() if l.startswith("bundled(crate(")]
    assert len(provides) == len(real), (len(provides), len(real))
    expected = sorted(f"bundled(crate({m['name']})) = {m['version'].replace('-', '~')}"
                      for m in map(crate_manifest, real.values()))
    assert sorted(provides) == expected
    licence = rpmq(rpms["dask-spank"], "--qf", "%{LICENSE}")
    ids = lambda e: set(re.findall(r"[A-Za-z0-9.+-]+", e)) - {"OR", "AND", "WITH"}  # noqa: E731
    crate_ids = set().union(*(ids(crate_manifest(f).get("license", "").replace("/", " OR ")) for f in real.values()))
    assert {"MIT", "Apache-2.0"} <= crate_ids and crate_ids <= ids(licence), (crate_ids - ids(licence), licence)
    assert rpmq(rpms["python3-dask-spank"], "--qf", "%{LICENSE}") == "MIT OR Apache-2.0"


def test_platform_crates_are_stubs(vendor):
    """cargo vendor copies the crates of every platform; the ones never built
    on Linux are stubs in the SRPM: no Windows crate keeps its sources (the
    offline rebuilds of this module then show that cargo accepts them)."""
    windows = {d: f for d, f in vendor.items() if crate_manifest(f)["name"].startswith(("windows", "winapi"))}
    assert len(windows) >= 5, sorted(vendor)
    kept = {d: sorted(f)[:5] for d, f in windows.items() if not is_stub(f)}
    assert kept == {}, kept
    for f in windows.values():
        assert json.loads(f[".cargo-checksum.json"])["files"] == {}
    total = sum(len(c) for f in vendor.values() for c in f.values())
    assert total < 120_000_000, total


def test_metadata_url_and_changelog(srpm, rpms):
    for rpm in (srpm, rpms["dask-spank"]):
        assert rpmq(rpm, "--qf", "%{URL}").startswith("https://")
    heads = [l for l in rpmq(rpms["dask-spank"], "--changelog").splitlines() if l.startswith("* ")]
    versions = [h.rsplit(" - ", 1)[1] for h in heads]
    assert versions and len(versions) == len(set(versions)), heads
    assert versions[0] == "0.1.0-1", heads


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
    in the included directory, which the sandbox's plugstack.conf is then
    to include (`include <dir>/*.conf`, alone)."""
    d = sb.STATE / "etc" / "plugstack.conf.d"
    d.mkdir(exist_ok=True)
    text = (payload / "etc/slurm/plugstack.conf.d/dask-spank.conf").read_text()
    lib = "/usr/lib64/slurm/spank_dask.so"
    assert f"#required {lib}\n" in text
    text = text.replace(f"#required {lib}", f"required {sb.STATE / 'lib/spank_dask.so'} "
                        f"agent_dir={sb.STATE / 'run/agent'} attach_cmd={sb.BIN / 'dask-spank'}")
    (d / "dask-spank.conf").write_text(text)
    return d


def test_payload_runs_a_dask_cluster(payload):
    """The packaged binaries, enabled through the packaged snippet as a
    site does it: a bare line (site-neutral policy) in an included file."""

    os.environ["DASK_SPANK_PAYLOAD"] = str(payload)
    snippets = enable_snippet(payload)
    try:
        sb.sandbox_up(plugstack_include=str(snippets))
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
        sched, arr = sb.plain_cluster_computes("rpm-payload")
        # The site-neutral snippet line sets no partition: Slurm's default.
        assert sb.scontrol_job(sched)["Partition"] == "htc"
        sb.run(["scancel", sched, arr])
        sb.wait_job_gone(sched)
        sb.wait_job_gone(arr)
    finally:
        del os.environ["DASK_SPANK_PAYLOAD"]
        sb.sandbox_up(plugstack_include=None)  # back to the build tree's binaries and policy line


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
        # scripts/package builds with EL's debug macros: specs from before
        # the debug info (and Source2) do not build that way.
        return has_commit and "--offline" in spec and "%include %{SOURCE2}" in spec
    return [c for c in out if offline(c)][:n]


def test_two_build_directories_give_identical_binaries(srpm, rpms, tmp_path):
    """The SRPM rebuilt in another directory (another _topdir, so another
    build path) gives bit-identical binaries: no build path is embedded."""
    again = rebuild_offline(srpm, sb.STATE / "rpm-rebuild-elsewhere")
    byname = {rpmq(f, "--qf", "%{NAME}"): f for f in again}
    first = unpack(rpms.values(), tmp_path / "first")
    second = unpack(byname.values(), tmp_path / "second")
    debug = lambda d, f: next((d / "usr/lib/debug" / f).parent.glob(Path(f).name + "-*.debug"))  # noqa: E731
    for f in BINARIES:
        a, b = (first / f).read_bytes(), (second / f).read_bytes()
        assert a == b, f"{f} differs between two build directories"
        assert b"rpm-rebuild" not in a, f"{f} holds a build path"
        # And so does their debug info.
        a, b = debug(first, f).read_bytes(), debug(second, f).read_bytes()
        assert a == b, f"{f}'s debug info differs between two build directories"
        assert b"rpm-rebuild" not in a, f"{f}'s debug info holds a build path"


def test_two_commits_package_their_own_code(payload):
    """A second commit, packaged after HEAD, ships its own binaries: each
    names its commit in --version, and the plugin names it too. (Commits
    from before the spec built with EL's debug macros are not packaged.)"""
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
