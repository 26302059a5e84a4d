"""The Debian packages of one Slurm release (the sandbox's, scripts/test
--slurm V): `scripts/package --deb` builds them from the same source tree
and pruned crates as the RPMs, offline, where that release's Slurm is
installed (the Debian root of 24.11 and 26.05, the host for 22.05). They are
inspected with dpkg-deb, installed with dpkg in the system the sandbox runs
in, a dask cluster is run from the installed files (the installed plugin
named by the installed conffile, the installed agent and command), and the
packages are upgraded, removed, reinstalled and purged as a site would,
leaving the system as it was."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import sandboxlib as sb

VERSION = "0.1.0-1"
CONF = Path("/etc/slurm/plugstack.conf.d/dask-spank.conf")

pytestmark = pytest.mark.skipif(
    not (shutil.which("dpkg-deb") and Path("/var/lib/dpkg/status").exists()),
    reason="not a Debian system: no dpkg to build or install .debs with")


def sh(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)


def multiarch() -> str:
    return sh("gcc", "-print-multiarch", check=True).stdout.strip()


def plugdir() -> str:
    """Debian's Slurm plugin directory (slurm-wlm's)."""
    return f"/usr/lib/{multiarch()}/slurm-wlm"


def arch() -> str:
    return sh("dpkg", "--print-architecture", check=True).stdout.strip()


def slurm_version() -> str:
    return sb.run(["sinfo", "-V"]).stdout.split()[1]


def libslurm_package() -> str:
    """The Debian package of the libslurm this release's headers link to
    (libslurmNN, or libslurmNNt64): its name carries the soname."""
    lib = sh("clang", "-print-file-name=libslurm.so", check=True).stdout.strip()
    soname = re.search(r"^\s*SONAME\s+(\S+)$", sh("objdump", "-p", lib, check=True).stdout, re.M).group(1)
    for d in (f"/usr/lib/{multiarch()}", f"/lib/{multiarch()}"):
        p = sh("dpkg", "-S", f"{d}/{soname}")
        if p.returncode == 0:
            return p.stdout.split(":")[0]
    raise AssertionError(f"no package holds {soname}")


def installed(pkg: str) -> bool:
    p = sh("dpkg-query", "-W", "-f=${Status}", pkg)
    return p.returncode == 0 and p.stdout == "install ok installed"


def known(pkg: str) -> bool:
    """Whether dpkg has any record of pkg (installed or its conffiles left)."""
    p = sh("dpkg-query", "-W", "-f=${Status}", pkg)
    return p.returncode == 0 and not p.stdout.endswith("not-installed")


def dpkg(*args) -> None:
    p = sh("dpkg", *args)
    assert p.returncode == 0, (args, p.stdout[-3000:], p.stderr[-3000:])


def contents(deb) -> dict[str, str]:
    """dpkg-deb -c: path -> mode string (directories end in /)."""
    out = sh("dpkg-deb", "-c", deb, check=True).stdout
    return {l.split()[-1][1:]: l.split()[0] for l in out.splitlines()}


def control(deb) -> dict[str, str]:
    out = sh("dpkg-deb", "-f", deb, check=True).stdout
    fields, key = {}, None
    for l in out.splitlines():
        if l.startswith(" ") and key:
            fields[key] += "\n" + l
        else:
            key, _, v = l.partition(": ")
            fields[key] = v
    return fields


def info(deb, member) -> subprocess.CompletedProcess:
    return sh("dpkg-deb", "-I", deb, member)


def active(d: Path) -> list[str]:
    """The lines slurmd reads from the included directory (*.conf)."""
    return [l for f in sorted(d.glob("*.conf")) for l in f.read_text().splitlines()
            if l.strip() and not l.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def debs():
    """scripts/package --deb: the two packages, one offline release build."""
    out = sb.STATE / "deb"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([str(sb.REPO / "scripts" / "package"), "--deb", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr[-5000:]
    files = p.stdout.split()
    assert [Path(f).name for f in files] == [f"dask-spank_{VERSION}_{arch()}.deb",
                                             f"python3-dask-spank_{VERSION}_all.deb"], files
    return {"dask-spank": files[0], "python3-dask-spank": files[1]}


def test_control_depends_and_conffiles(debs):
    deb = debs["dask-spank"]
    c = control(deb)
    assert (c["Package"], c["Version"], c["Architecture"]) == ("dask-spank", VERSION, arch()), c
    assert c["Description"].startswith("Dask clusters as Slurm jobs") and f"Slurm {slurm_version()}" in c["Description"]
    depends = [d.strip() for d in c["Depends"].split(",")]
    # Tied to the Slurm release through libslurm's package (its soname), and
    # glibc at least what the binaries use; no slurmd on login nodes.
    assert libslurm_package() in depends, depends
    glibc = [d for d in depends if d.startswith("libc6 (>= ")]
    assert len(glibc) == 1 and tuple(map(int, re.findall(r"\d+", glibc[0]))) >= (2, 34), depends
    assert not [d for d in depends if d.startswith(("slurmd", "slurm-wlm"))], depends
    assert c["Recommends"] == "slurmd"
    assert int(c["Installed-Size"]) > 1000
    assert info(deb, "conffiles").stdout.split() == [str(CONF)]
    for script in ("postinst", "prerm", "postrm"):
        p = info(deb, script)
        assert p.returncode == 0 and p.stdout.startswith("#!/bin/sh\n"), (script, p.stderr)
    assert "dask-spank.conf.dpkg-bak" in info(deb, "postrm").stdout
    # md5sums lists every regular file, and only those.
    files = {f.lstrip("/") for f, mode in contents(deb).items() if mode.startswith("-")}
    sums = {l.split(None, 1)[1] for l in info(deb, "md5sums").stdout.splitlines()}
    assert sums == files, sums ^ files
    py = control(debs["python3-dask-spank"])
    assert (py["Package"], py["Version"], py["Architecture"]) == ("python3-dask-spank", VERSION, "all"), py
    assert py["Depends"].startswith("python3"), py
    assert info(debs["python3-dask-spank"], "conffiles").stdout.split() == [
        "/etc/jupyter/jupyter_server_config.d/dask_spank.json"]


def test_file_lists(debs):
    files = {f for f, mode in contents(debs["dask-spank"]).items() if not mode.startswith("d")}
    doc = "/usr/share/doc/dask-spank"
    assert files == {
        f"{plugdir()}/spank_dask.so",
        "/usr/bin/dask-spank",
        "/usr/sbin/dask-node-agent",
        "/usr/lib/systemd/system/dask-node-agent.service",
        "/usr/libexec/dask-spank/health",
        str(CONF),
        f"{doc}/README.md", f"{doc}/admin.md", f"{doc}/user.md", f"{doc}/examples/cc-in2p3.conf",
        f"{doc}/copyright", f"{doc}/changelog.Debian.gz",
    }, files
    modes = contents(debs["dask-spank"])
    assert modes["/usr/sbin/dask-node-agent"] == "-rwxr-xr-x" and modes[str(CONF)] == "-rw-r--r--"
    py = {f for f, mode in contents(debs["python3-dask-spank"]).items() if not mode.startswith("d")}
    site = "/usr/lib/python3/dist-packages"
    for f in ("dask_spank/__init__.py", "dask_spank/cluster.py", "dask_spank-0.1.0.dist-info/METADATA"):
        assert f"{site}/{f}" in py, (f, sorted(py))
    assert not [f for f in py if f.endswith(".so") or "__pycache__" in f or "slurm" in f], py


def test_payload_is_the_commit_and_the_snippet_inactive(debs, tmp_path):
    sh("dpkg-deb", "-x", debs["dask-spank"], str(tmp_path), check=True)
    head = sh("git", "-C", str(sb.REPO), "rev-parse", "HEAD", check=True).stdout.strip()
    for b in ("usr/bin/dask-spank", "usr/sbin/dask-node-agent"):
        v = sh(str(tmp_path / b), "--version", check=True).stdout
        assert f"(commit {head})" in v, (b, v)
    assert head.encode() in (tmp_path / plugdir().lstrip("/") / "spank_dask.so").read_bytes()
    snippet = (tmp_path / str(CONF).lstrip("/")).read_text()
    assert active(tmp_path / "etc/slurm/plugstack.conf.d") == []
    assert f"\n#required {plugdir()}/spank_dask.so\n" in snippet, snippet
    assert ".rpmsave" not in snippet and "dask-spank.conf.dpkg-bak" in snippet
    example = (tmp_path / "usr/share/doc/dask-spank/examples/cc-in2p3.conf").read_text()
    assert [l for l in example.splitlines() if l.startswith("required ")][0].startswith(
        f"required {plugdir()}/spank_dask.so ")
    # Debian's Slurm keeps its own plugins in that directory.
    assert list(Path(plugdir()).glob("select_*.so")) or list(Path(plugdir()).glob("auth_*.so")), plugdir()


def plain_job_runs() -> str:
    job = sb.sbatch("--wrap=true", "-o", "/dev/null")
    sb.wait_job_gone(job, 60)
    return sb.job_state(job)


def test_install_run_upgrade_remove_purge(debs):
    """dpkg -i in the system the sandbox runs in; the admin enables the
    installed snippet in place; a dask cluster runs from the installed
    plugin, agent and command; an upgrade keeps the edit; removal takes
    the plugin and sets the edited snippet aside (plain jobs run, the
    plugin's options are gone); a reinstall puts it back; purge leaves
    nothing."""

    for pkg in debs:
        assert not known(pkg), f"{pkg} is already on this system: the test would not leave it as it found it"
    confd = CONF.parent
    before = sorted(p.name for p in confd.iterdir()) if confd.is_dir() else None
    lib = f"{plugdir()}/spank_dask.so"
    try:
        dpkg("-i", debs["dask-spank"], debs["python3-dask-spank"])
        assert installed("dask-spank") and installed("python3-dask-spank")
        assert lib in sh("dpkg", "-L", "dask-spank", check=True).stdout.split()
        assert active(confd) == [], "installed inactive"
        p = sh("/usr/bin/python3", "-c", "import importlib.util; print(importlib.util.find_spec('dask_spank').origin)")
        assert p.stdout.strip() == "/usr/lib/python3/dist-packages/dask_spank/__init__.py", p.stdout + p.stderr
        # The admin enables it in place (the sandbox's agent directory; the
        # job script runs the default attach_cmd, the installed /usr/bin/dask-spank).
        line = f"required {lib} agent_dir={sb.STATE / 'run' / 'agent'}"
        CONF.write_text(CONF.read_text().replace(f"#required {lib}\n", line + "\n"))
        assert active(confd) == [line]
        # An upgrade (the same package again) keeps the edit, asking nothing.
        dpkg("-i", debs["dask-spank"])
        assert active(confd) == [line]

        # slurmd and sbatch read the installed snippet, as on a Debian node.
        os.environ["DASK_SPANK_PAYLOAD"] = "/"
        sb.sandbox_up(plugstack_include=str(confd))
        conf = (sb.STATE / "etc" / "plugstack.conf").read_text()
        assert conf == f"include {confd}/*.conf\n", conf
        for running, shipped in [(sb.BIN / "dask-node-agent", "/usr/sbin/dask-node-agent"),
                                 (sb.BIN / "dask-spank", "/usr/bin/dask-spank")]:
            assert running.read_bytes() == Path(shipped).read_bytes(), running
        out = sb.run(["/usr/sbin/dask-node-agent", "check", "--agent-dir", str(sb.STATE / "run" / "agent"),
                      "--node", "n1"]).stdout
        assert "answers" in out
        sched, arr = sb.plain_cluster_computes("deb-installed")
        # The plugin that ran is the installed one, built for this release.
        log = (sb.LOGS / "slurmd-n1.log").read_text().splitlines()
        assert f"built for Slurm {slurm_version()}, commit " in [l for l in log if "dask-spank plugin" in l][-1]
        sb.run(["scancel", sched, arr])
        sb.wait_job_gone(sched)
        sb.wait_job_gone(arr)
        del os.environ["DASK_SPANK_PAYLOAD"]

        # Removal: the plugin goes, the edited snippet is set aside where
        # slurmd does not read it; plain jobs run, the plugin's options are gone.
        dpkg("-r", "dask-spank")
        assert not Path(lib).exists() and not Path("/usr/sbin/dask-node-agent").exists()
        assert active(confd) == [], sorted(p.name for p in confd.iterdir())
        saved = confd / "dask-spank.conf.dpkg-bak"
        assert line in saved.read_text().splitlines(), "the admin's policy is kept"
        assert plain_job_runs() == "COMPLETED"
        p = sb.as_user(["sbatch", "--dask-role=worker", "--dask-cluster=gone", "--wrap=true"], check=False)
        assert p.returncode != 0 and "dask-role" in p.stderr, p.stdout + p.stderr
        # Reinstalling puts the plugin and the edited snippet back.
        dpkg("-i", debs["dask-spank"])
        assert active(confd) == [line] and Path(lib).exists() and not saved.exists()

        # Purge: nothing of either package is left.
        dpkg("--purge", "dask-spank", "python3-dask-spank")
        assert not known("dask-spank") and not known("python3-dask-spank")
        for deb in debs.values():
            left = [f for f, mode in contents(deb).items() if not mode.startswith("d") and os.path.lexists(f)]
            assert left == [], left
        assert not saved.exists()
        assert (sorted(p.name for p in confd.iterdir()) if confd.is_dir() else None) == before
        assert active(confd) == []
        assert plain_job_runs() == "COMPLETED"
    finally:
        os.environ.pop("DASK_SPANK_PAYLOAD", None)
        sh("dpkg", "--purge", "dask-spank", "python3-dask-spank")
        sb.sandbox_up(plugstack_include=None)  # back to the build tree's binaries and policy line


def next_release_commit() -> str:
    """A commit of the next release, made from HEAD in the repository's
    object store only (no branch, no working tree change): version 0.1.1,
    and the protocol version one higher, with the same messages, as a
    release that bumps it without breaking its peers. Its tree differs from
    HEAD's in Cargo.toml, Cargo.lock (the workspace's crates) and
    common/src/lib.rs."""
    def git(*args, env=None, stdin=None) -> str:
        return subprocess.run(["git", "-C", str(sb.REPO), *args], capture_output=True, text=True, check=True,
                              env={**os.environ, **(env or {})}, input=stdin).stdout.strip()

    members = {p["name"] for p in json.loads(subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"], cwd=sb.REPO,
        capture_output=True, text=True, check=True).stdout)["packages"]}
    changed = {"Cargo.toml": git("show", "HEAD:Cargo.toml").replace('\nversion = "0.1.0"', '\nversion = "0.1.1"', 1)}
    lock = git("show", "HEAD:Cargo.lock")
    for name in members:
        lock = lock.replace(f'name = "{name}"\nversion = "0.1.0"', f'name = "{name}"\nversion = "0.1.1"')
    changed["Cargo.lock"] = lock
    lib = git("show", "HEAD:common/src/lib.rs")
    m = re.search(r"#\[cfg\(not\(dask_spank_next_protocol\)\)\]\npub const PROTOCOL_VERSION: u32 = (\d+);", lib)
    assert m, "common/src/lib.rs: no PROTOCOL_VERSION to bump"
    changed["common/src/lib.rs"] = lib.replace(m.group(0), m.group(0).replace(f"= {m.group(1)};",
                                                                              f"= {int(m.group(1)) + 1};"))
    for path, text in changed.items():
        assert text != git("show", f"HEAD:{path}"), f"{path}: nothing to change for the next release"
    index = {"GIT_INDEX_FILE": str(sb.STATE / "next-release.index")}
    git("read-tree", "HEAD", env=index)
    for path, text in changed.items():
        blob = git("hash-object", "-w", "--stdin", stdin=text + "\n")
        git("update-index", "--cacheinfo", f"100644,{blob},{path}", env=index)
    tree = git("write-tree", env=index)
    return git("commit-tree", tree, "-p", "HEAD", "-m", "next release (test_deb)", env={
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"})


def test_an_upgrade_to_the_next_release_keeps_a_running_cluster(debs):
    """Install this release; a cluster runs from it; upgrade to the next
    release, whose agent speaks the next protocol version, while that
    cluster runs (dpkg -i, then the agent restarted on the new binary, as
    the unit's restart does): the cluster's workers, adopted by the new
    agent, compute again with the same client, a new cluster starts from
    the upgraded plugin and command, and plain jobs run after each step."""
    out = sb.STATE / "deb-next"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([str(sb.REPO / "scripts" / "package"), "--commit", next_release_commit(), "--deb", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr[-5000:]
    nxt = dict(zip(["dask-spank", "python3-dask-spank"], p.stdout.split()))
    assert Path(nxt["dask-spank"]).name == f"dask-spank_0.1.1-1_{arch()}.deb", nxt
    import agentproto

    confd, lib = CONF.parent, f"{plugdir()}/spank_dask.so"
    line = f"required {lib} agent_dir={sb.STATE / 'run' / 'agent'}"
    try:
        dpkg("-i", debs["dask-spank"], debs["python3-dask-spank"])
        CONF.write_text(CONF.read_text().replace(f"#required {lib}\n", line + "\n"))
        os.environ["DASK_SPANK_PAYLOAD"] = "/"
        sb.sandbox_up(plugstack_include=str(confd))
        assert plain_job_runs() == "COMPLETED"
        assert sb.agent_speaks(agentproto.VERSION) and not sb.agent_speaks(agentproto.VERSION + 1)
        name = "deb-upgraded"
        sb.forget_cluster(name)
        sb.sbatch("--dask-role=scheduler", f"--dask-cluster={name}")
        sb.sbatch("--dask-role=worker", f"--dask-cluster={name}", "--array=1-2")
        sb.wait_scheduler_file(name, 120)
        c = sb.client(name)
        try:
            c.wait_for_workers(2, timeout=120)
            workers = c.run(os.getpid)
            assert c.submit(sum, range(100)).result(timeout=60) == 4950

            dpkg("-i", nxt["dask-spank"], nxt["python3-dask-spank"])
            assert sh("dpkg-query", "-W", "-f=${Version}", "dask-spank").stdout == "0.1.1-1"
            assert active(confd) == [line], "the upgrade keeps the admin's edit"
            sb.sandbox_up()  # the new agent binary: the agent restarts, as systemctl restart does
            assert sb.agent_speaks(agentproto.VERSION + 1) and sb.agent_speaks(agentproto.VERSION), \
                "the new agent speaks the next version and still serves the running jobs' one"
            assert c.submit(sum, range(1000), pure=False).result(timeout=60) == 499500
            assert c.run(os.getpid) == workers, "the same worker processes, adopted by the new agent"
        finally:
            c.close()
        sb.plain_cluster_computes("deb-next-release")
        assert plain_job_runs() == "COMPLETED"
    finally:
        sb.cancel_all_user_jobs(120)
        os.environ.pop("DASK_SPANK_PAYLOAD", None)
        sh("dpkg", "--purge", "dask-spank", "python3-dask-spank")
        sb.sandbox_up(plugstack_include=None)
    assert plain_job_runs() == "COMPLETED"
