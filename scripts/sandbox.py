"""The sandbox: a real Slurm cluster on this machine, without systemd.

munged, slurmctld, N slurmd (n1..nN on one host, each with its own port
and its own dask-spank node agent) and, with accounting, MariaDB and
slurmdbd: each a `Daemon` started by hand with its state under the state
directory (default .sandbox/, git-ignored) and stopped by the PID recorded
at its start, never by name.

`Sandbox().up(nodes=…, cpus=…, accounting=…, policy=…, site=…, …)` makes
the configuration from its `Settings` (kept in etc/sandbox.json, so that a
later `up()` with no arguments keeps them), installs the build products,
and starts what does not run; what a change needs restarted is restarted:
slurmctld and slurmd when slurm.conf changed, slurmd when the plugin or
plugstack.conf did, an agent when its binary did. The tests call it in
their own process; `scripts/sandbox` (bash: the Debian root re-exec only)
runs this file's command line.

The places, ports and names (state directory, release, test user, port
base) are stated once, in scripts/lib.sh, which the bash scripts need
before any Python exists; this module reads them from there.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def _layout() -> dict[str, str]:
    """scripts/lib.sh's layout (its `sandbox_layout`), for this process's
    environment (DASK_SPANK_SLURM, DASK_SPANK_SANDBOX, DASK_SPANK_PORT_BASE,
    DASK_SPANK_TEST_USER)."""
    lib = REPO / "scripts" / "lib.sh"
    p = subprocess.run(["bash", "-c", '. "$0" && sandbox_layout', str(lib)],
                       capture_output=True, text=True, env=os.environ)
    if p.returncode != 0:
        raise SystemExit(p.stderr.strip() or f"{lib} failed ({p.returncode})")
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


LAYOUT = _layout()
SLURM_RELEASE = LAYOUT["SLURM_RELEASE"]
HOST_SLURM = LAYOUT["HOST_SLURM"]
STATE = Path(LAYOUT["STATE"])
TARGET = Path(LAYOUT["TARGET"])
TEST_USER = LAYOUT["TEST_USER"]
# A second unprivileged user for tests of what one user cannot do to
# another's jobs; derived from TEST_USER so that two sandboxes never share it.
OTHER_USER = TEST_USER + "b"
IN_ROOT = LAYOUT["IN_ROOT"]
# slurmctld's port; slurmdbd, MariaDB and the slurmd of each node follow it,
# and each node's agent serves its metrics over HTTP 100 above it.
CTLD_PORT = int(LAYOUT["CTLD_PORT"])
DBD_PORT = CTLD_PORT + 2
MARIADB_PORT = CTLD_PORT + 3
VENV = Path(LAYOUT["VENV"])
BIN = Path(LAYOUT["BIN"])
ETC, RUN, LOGS = STATE / "etc", STATE / "run", STATE / "log"
SLURM_CONF = ETC / "slurm.conf"
AGENT_DIR = RUN / "agent"
MUNGE_SOCKET = RUN / "munge" / "munge.socket.2"
HOME = STATE / "home" / TEST_USER
WORK = STATE / "work"
# GPUs each node declares (a gres whose device files are /dev/null).
NGPUS = 4
CLUSTER = "dasksandbox"


def slurmd_port(i: int) -> int:
    """The slurmd port of node n<i>."""
    return CTLD_PORT + 3 + i


def metrics_port(i: int) -> int:
    """The HTTP metrics port of the agent of node n<i>."""
    return CTLD_PORT + 100 + i


def env() -> dict[str, str]:
    """This process's environment with the sandbox's Slurm and binaries."""
    e = dict(os.environ)
    e["SLURM_CONF"] = str(SLURM_CONF)
    e["PATH"] = f"{VENV}/bin:{BIN}:" + e.get("PATH", "/usr/bin:/bin")
    e["DASK_SPANK_SANDBOX"] = str(STATE)
    e["DASK_SPANK_SLURM"] = SLURM_RELEASE
    return e


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [sandbox] {msg}", file=sys.stderr, flush=True)


def mount_points() -> set[str]:
    """Every mount point this process sees (/proc/self/mountinfo's fifth
    field, its octal escapes decoded)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return set()
    unescape = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)))
    return {unescape(fields[4]) for fields in map(str.split, lines) if len(fields) > 4}


def take_over(top: Path, uid: int, gid: int, former: int | None = None) -> int:
    """Everything under top that `former` owns, or that no account owns any
    more (a user deleted, or made again with a new uid, earlier still), to
    uid:gid (symlinks themselves, not followed). How many were given.

    Mount points are neither looked at nor entered, and nothing is looked at
    through a symlink (os.walk's is_dir() stats a link's target): the
    users' FUSE mounts in the work directory (test_hungfs) refuse root, or
    hang a frozen one's caller; what they hold is not the sandbox's."""
    @functools.lru_cache(maxsize=None)
    def orphan(owner: int) -> bool:
        try:
            pwd.getpwuid(owner)
            return False
        except KeyError:
            return True

    mounts, given, todo = mount_points(), 0, [os.fspath(top)]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                entries = list(entries)
        except OSError:  # gone meanwhile, or not a directory
            continue
        for e in entries:
            if e.path in mounts:
                continue
            try:
                # No stat through a link, here or in is_dir().
                owner = e.stat(follow_symlinks=False).st_uid
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
            except OSError:  # gone meanwhile
                continue
            if owner != uid and (owner == former or orphan(owner)):
                os.lchown(e.path, uid, gid)
                given += 1
    return given


class SandboxError(RuntimeError):
    pass


def wait_for(seconds: float, what: str, ready: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > end:
            raise SandboxError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(0.2)


def slurm(*args: str, check: bool = False) -> str:
    """Run a Slurm (or other) command with the sandbox's environment; its
    standard output."""
    return subprocess.run(args, env=env(), capture_output=True, text=True, check=check).stdout


def succeeds(*args: str) -> Callable[[], bool]:
    return lambda: subprocess.run(args, env=env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def tail(path: Path, lines: int) -> list[str]:
    """The last lines of a log (none if it is missing)."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie does not count: a daemon killed while
    re-parented to a PID 1 that does not reap stays a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# -- the configuration --------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What the sandbox is asked to be; kept between `up`s."""
    nodes: int = 1
    # CPUs each node declares: many small jobs share the 2 real cores.
    cpus: int = 256
    # slurmdbd (and its MariaDB) with the association limits enforced.
    accounting: bool = False
    # The site's policy keys; None: those of the example site policy
    # shipped in the package (packaging/examples/cc-in2p3.conf).
    site: str | None = None
    # Extra policy keys (tests); a key given in both takes this value.
    policy: str = ""
    # A directory of plugstack.conf snippets to include instead of the
    # sandbox's own line (as a site installs the package).
    plugstack_include: str | None = None
    # The health check (a node whose agent does not answer is drained);
    # off for tests that need a dead agent on an undrained node.
    health_check: bool = True

    def check(self) -> None:
        if not 1 <= self.nodes <= 99:
            raise SandboxError(f"nodes={self.nodes}: want a number from 1 to 99")
        if not 1 <= self.cpus <= 9999:
            raise SandboxError(f"cpus={self.cpus}: want a number from 1 to 9999")

    @staticmethod
    def load() -> Settings:
        try:
            kept = json.loads((ETC / "sandbox.json").read_text())
        except (OSError, ValueError):
            return Settings()
        names = {f.name for f in fields(Settings)}
        return Settings(**{k: v for k, v in kept.items() if k in names})

    def save(self) -> None:
        write_if_changed(ETC / "sandbox.json", json.dumps(asdict(self), indent=1) + "\n")

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write through a temporary file and a rename; False if unchanged."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def slurm_conf(s: Settings) -> str:
    nodes = "".join(
        f"NodeName={n} NodeAddr=127.0.0.1 Port={slurmd_port(i)} CPUs={s.cpus} RealMemory=2000000 "
        f"Gres=gpu:{NGPUS} State=UNKNOWN\n" for i, n in enumerate(s.node_names(), 1))
    names = ",".join(s.node_names())
    if s.accounting:
        # For slurmdbd, the "password" is the munge socket (AuthInfo is not used there).
        accounting = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                      f"AccountingStoragePort={DBD_PORT}\nAccountingStorageEnforce=associations,limits\n"
                      f"AccountingStoragePass={MUNGE_SOCKET}\n")
    else:
        accounting = "AccountingStorageType=accounting_storage/none\n"
    return f"""# Generated by scripts/sandbox.py.
ClusterName={CLUSTER}
SlurmctldHost={short_hostname()}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={MUNGE_SOCKET}
CredType=cred/munge
StateSaveLocation={STATE}/ctld
SlurmdSpoolDir={STATE}/spool/%n
SlurmctldPidFile={RUN}/slurmctld.pid.slurm
SlurmdPidFile={RUN}/slurmd-%n.pid.slurm
SlurmctldLogFile={LOGS}/slurmctld.log
SlurmdLogFile={LOGS}/slurmd-%n.log
PlugStackConfig={ETC}/plugstack.conf
# Real job cgroups (cgroup v1 on these machines): Slurm tracks and limits a
# job's processes, and the node agent starts dask inside them.
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
SelectType=select/cons_tres
# Memory is a consumable resource, as on real sites: slurmstepd then knows
# each job's memory, which the node agent takes from it.
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=256
{accounting}JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MaxArraySize=4001
MaxJobCount=20000
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,default_queue_depth=10000,bf_interval=5
SlurmdParameters=config_overrides
Licenses=sps:1000,other:1000
# Generic resources without devices: each node declares {NGPUS} "gpu" whose
# device files are links to /dev/null (gres.conf), so that jobs and dask
# worker pools can ask for GPUs on a machine that has none.
GresTypes=gpu
# A lost node is declared down after 10 s (the node-loss test relies on it).
SlurmdTimeout=10
# dask-spank's health check: a node whose agent does not answer is drained.
HealthCheckProgram={BIN}/dask-spank-health
HealthCheckInterval=5
HealthCheckNodeState=ANY
{nodes}PartitionName=htc_daemon Nodes={names} MaxTime=INFINITE State=UP
PartitionName=htc Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


CGROUP_CONF = """# Generated by scripts/sandbox.py.
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
"""


def example_site_keys() -> list[str]:
    """The policy keys of the example site policy shipped in the package."""
    keys = []
    for line in (REPO / "packaging" / "examples" / "cc-in2p3.conf").read_text().splitlines():
        words = line.split()
        if words[:1] == ["required"]:
            keys += words[2:]
    return keys


def policy_keys(s: Settings) -> list[str]:
    """The plugin's arguments: the sandbox's own, the site's, then the
    tests'; a key given twice keeps its first place and its last value."""
    site = example_site_keys() if s.site is None else s.site.split()
    merged: dict[str, str] = {}
    for kv in [f"agent_dir={AGENT_DIR}", f"attach_cmd={BIN}/dask-spank", *site, *s.policy.split()]:
        merged[kv.split("=", 1)[0]] = kv
    return list(merged.values())


def plugstack_conf(s: Settings) -> str:
    if s.plugstack_include:
        return f"include {s.plugstack_include}/*.conf\n"
    return " ".join(["required", f"{STATE}/lib/spank_dask.so", *policy_keys(s)]) + "\n"


def health_check_script(s: Settings) -> str:
    e = env()
    run = (f'exec {BIN}/dask-node-agent health --agent-dir {AGENT_DIR} "$@"' if s.health_check
           else "exit 0  # off: Settings.health_check")
    return (f"#!/bin/sh\n# HealthCheckProgram of the sandbox (slurmd sets SLURMD_NODENAME).\n"
            f"export SLURM_CONF={SLURM_CONF} PATH={e['PATH']}\n{run}\n")


def gres_conf() -> str:
    return (f"# Generated by scripts/sandbox.py: GPUs whose device files are /dev/null.\n"
            f"Name=gpu File={STATE}/gres/gpu[0-{NGPUS - 1}]\n")


# -- the daemons -----------------------------------------------------------------

@dataclass
class Daemon:
    """A process the sandbox starts and stops, known by its pid file."""
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    ready_within: float = 30
    log: str = ""
    extra_env: dict[str, str] | None = None
    # Its standard output and error (default: LOGS/<name>.out).
    output: Path | None = None

    @property
    def pidfile(self) -> Path:
        return RUN / f"{self.name}.pid"

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and alive(pid)

    def start(self) -> None:
        if self.running():
            return
        out = self.output or LOGS / f"{self.name}.out"
        # Through sh's `&`: the daemon is no child of the caller (a test's
        # process), in a session of its own, its output appended to a file.
        p = subprocess.run(["sh", "-c", 'setsid "$@" </dev/null >>"$OUT" 2>&1 & echo $!', "sh", *self.argv],
                           env={**env(), **(self.extra_env or {}), "OUT": str(out)},
                           capture_output=True, text=True, check=True)
        self.pidfile.write_text(p.stdout.strip() + "\n")
        try:
            wait_for(self.ready_within, self.name, self.ready)
        except SandboxError as e:
            raise SandboxError(f"{self.name} did not start ({e}; see {self.log or out})") from None

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None and alive(pid):
            os.kill(pid, 15)
            end = time.monotonic() + 10
            while alive(pid) and time.monotonic() < end:
                time.sleep(0.1)
            if alive(pid):
                log(f"pid {pid} ({self.name}) ignored SIGTERM for 10s: SIGKILL")
                os.kill(pid, 9)
        self.pidfile.unlink(missing_ok=True)


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Sandbox:
    """The cluster: its daemons, made from `Settings`."""

    def __init__(self):
        self.settings = Settings.load()

    # The daemons, by name (their pid files are RUN/<name>.pid).

    def munged(self) -> Daemon:
        return Daemon("munged", ["munged", "-F", "--force", f"--socket={MUNGE_SOCKET}",
                                 f"--key-file={STATE}/munge/munge.key", f"--pid-file={RUN}/munge/munged.pid",
                                 f"--log-file={LOGS}/munged.log", f"--seed-file={STATE}/munge/seed"],
                      MUNGE_SOCKET.is_socket, 10, f"{LOGS}/munged.log")

    def slurmctld(self) -> Daemon:
        return Daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(SLURM_CONF)],
                      succeeds("scontrol", "ping"), 30, f"{LOGS}/slurmctld.log")

    def slurmd(self, node: str) -> Daemon:
        # Not waited for here: `up` waits for every node to be idle.
        return Daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(SLURM_CONF)],
                      lambda: True, 0, f"{LOGS}/slurmd-{node}.log")

    def agent(self, node: str) -> Daemon:
        # Metrics over HTTP on loopback, as a site may enable them
        # (tests/test_siteops). A start may take 10 s to reach its exec (30 s
        # by default): the tests of hung file systems (tests/test_hungfs.py)
        # wait that long for each case. The Slurm commands it runs are
        # counted (scripts/bench reports calls per job start).
        agent = str(BIN / "dask-node-agent")
        return Daemon(f"agent-{node}", [
            agent, "run", "--agent-dir", str(AGENT_DIR), "--node", node, "--dask-host", "127.0.0.1",
            "--metrics-addr", f"127.0.0.1:{metrics_port(int(node[1:]))}",
            "--start-timeout", os.environ.get("DASK_SPANK_START_TIMEOUT", "10s")],
            succeeds(agent, "check", "--agent-dir", str(AGENT_DIR), "--node", node), 10,
            f"{LOGS}/agent-{node}.log", {"PATH": f"{counted_slurm_commands()}:{env()['PATH']}"},
            LOGS / f"agent-{node}.log")

    def mariadb(self) -> Daemon:
        # Its own data directory, socket and loopback port (never the
        # system's database). Without TLS (loopback only): Slurm 26.05's
        # slurmdbd fails its first query over a TLS connection to sid's
        # MariaDB 11.8 ("5027 Number of columns in result set exceeds maximum
        # allowed"), and works over plain TCP (it asks for TLS first, then
        # retries in 5 s without). The snapshot isolation of 11.8, which
        # slurmdbd says it does not support, is turned off.
        return Daemon("mariadb", [
            "mariadbd", "--no-defaults", f"--datadir={STATE}/mariadb", f"--socket={RUN}/mariadb.sock",
            f"--port={MARIADB_PORT}", "--bind-address=127.0.0.1", "--skip-name-resolve", "--skip-ssl",
            "--loose-innodb-snapshot-isolation=OFF", "--user=root", f"--pid-file={RUN}/mariadb.pid.own",
            f"--log-error={LOGS}/mariadb.log"],
            succeeds(*self.mariadb_client(), "-e", "select 1"), 30, f"{LOGS}/mariadb.log")

    def slurmdbd(self) -> Daemon:
        return Daemon("slurmdbd", ["slurmdbd", "-D"], succeeds("sacctmgr", "-n", "list", "cluster"), 30,
                      f"{LOGS}/slurmdbd.log")

    @staticmethod
    def mariadb_client() -> list[str]:
        return ["mariadb", "--no-defaults", "--skip-ssl", f"--socket={RUN}/mariadb.sock", "-u", "root"]

    def daemons(self) -> list[Daemon]:
        """Every daemon of the current settings, in start order."""
        nodes = self.settings.node_names()
        dbd = [self.mariadb(), self.slurmdbd()] if self.settings.accounting else []
        return [self.munged(), *dbd, self.slurmctld(), *map(self.slurmd, nodes), *map(self.agent, nodes)]

    # -- up --------------------------------------------------------------------

    def up(self, **changes) -> None:
        """Make the sandbox run with these settings changed (the others as
        kept); idempotent."""
        new = replace(self.settings, **changes)
        new.check()
        release = ETC / "release"
        if release.exists() and release.read_text().strip() != SLURM_RELEASE:
            raise SandboxError(f"{STATE} belongs to Slurm {release.read_text().strip()}, not {SLURM_RELEASE}")
        for d in (ETC, RUN, LOGS, STATE / "ctld", AGENT_DIR, STATE / "lib", BIN, RUN / "munge"):
            d.mkdir(parents=True, exist_ok=True)
        write_if_changed(release, SLURM_RELEASE + "\n")
        # Install what is missing, build (scripts/sandbox has just done it).
        if not os.environ.pop("DASK_SPANK_SETUP_DONE", None):
            subprocess.run([str(REPO / "scripts" / "setup")], check=True, env=os.environ)
        previous, self.settings = self.settings, new
        new.save()
        try:
            self.start(new)
        except BaseException:
            # The settings kept are those of the last `up` that worked: a
            # later `up` (the next test's) starts from them instead of
            # failing the same way (three nodes that would not come up,
            # asked for again by every test that changes the policy).
            self.settings = previous
            previous.save()
            raise
        version = slurm("sinfo", "-V").split()
        log(f"sandbox up (Slurm {version[-1] if version else '?'}, ports {CTLD_PORT}+): "
            + ";".join(slurm("sinfo", "-h", "-o", "%P %a %D %t").split("\n")))

    def start(self, new: Settings) -> None:
        """Render `new`, then start or restart what it changes."""
        conf_changed, plugstack_changed = self.write_config()
        self.ensure_users()
        restart_slurmd, restart_agent = self.install_binaries()
        restart_slurmd |= plugstack_changed
        self.start_munge()
        ctld = self.slurmctld()
        if conf_changed and ctld.running():
            # Nodes, their gres or the accounting plugin changed: slurmctld
            # must restart (reconfigure is not enough).
            log("slurm.conf changed: restarting slurmctld and slurmd")
            ctld.stop()
            restart_slurmd = True
        self.start_accounting()
        self.stop_extra_nodes()
        if not ctld.running() and port_busy(CTLD_PORT):
            raise SandboxError(f"port {CTLD_PORT} is taken (another sandbox? scripts/sandbox --slurm V down; "
                               "or set DASK_SPANK_PORT_BASE)")
        ctld.start()
        slurm("scontrol", "reconfigure")
        for node in new.node_names():
            # The agent first: slurmd's health check drains a node without one.
            agent, slurmd = self.agent(node), self.slurmd(node)
            if restart_agent and agent.running():
                log(f"agent binary changed: restarting the agent of {node}")
                agent.stop()
            agent.start()
            if restart_slurmd and slurmd.running():
                log(f"plugin or plugstack.conf changed: restarting slurmd {node}")
                slurmd.stop()
            slurmd.start()
        for node in new.node_names():
            try:
                wait_for(60, f"node {node} to be idle", lambda: self.node_ready(node))
            except SandboxError as e:
                raise SandboxError(f"{e}: node {node} is not up ({self.node_trouble(node)})") from None
            slurm("scontrol", "update", f"nodename={node}", "state=resume")

    def node_trouble(self, node: str) -> str:
        """What Slurm says of a node that did not come up, and the last error
        in its slurmd's log: one line, for the error a test shows."""
        said = slurm("sinfo", "-h", "-n", node, "-o", "%t, reason: %E").strip().replace("\n", "; ")
        errors = [line.strip() for line in tail(LOGS / f"slurmd-{node}.log", 200) if "error" in line]
        return (f"sinfo: {said or 'no such node'}; slurmd's last error: {errors[-1] if errors else 'none'}; "
                f"see {LOGS}/slurmd-{node}.log")

    def write_config(self) -> tuple[bool, bool]:
        """Every configuration file; whether slurm.conf and plugstack.conf
        changed."""
        s = self.settings
        for n in s.node_names():
            (STATE / "spool" / n).mkdir(parents=True, exist_ok=True)
        conf = write_if_changed(SLURM_CONF, slurm_conf(s))
        # Slurm's gpu plugin drops a GPU without a device file ("Removing
        # file-less GPU" in slurmd's debug log; the node then reports 0 and
        # is INVAL): each GPU is a link to /dev/null, named with its index
        # (Slurm numbers GPUs by the file name's digits; devices are not
        # constrained).
        (STATE / "gres").mkdir(exist_ok=True)
        for i in range(NGPUS):
            link = STATE / "gres" / f"gpu{i}"
            if not link.is_symlink():
                link.unlink(missing_ok=True)
                link.symlink_to("/dev/null")
        write_if_changed(ETC / "gres.conf", gres_conf())
        write_if_changed(ETC / "cgroup.conf", CGROUP_CONF)
        write_if_changed(BIN / "dask-spank-health", health_check_script(s), 0o755)
        plugstack = write_if_changed(ETC / "plugstack.conf", plugstack_conf(s))
        return conf, plugstack

    def set_health_check(self, on: bool) -> None:
        """The health check on or off, at once (slurmd runs the script anew
        each time)."""
        self.settings = replace(self.settings, health_check=on)
        self.settings.save()
        write_if_changed(BIN / "dask-spank-health", health_check_script(self.settings), 0o755)

    def ensure_users(self) -> None:
        """The test user, homed in the state directory; its work directory."""
        home = str(HOME)
        p = subprocess.run(["getent", "passwd", TEST_USER], capture_output=True, text=True)
        if p.returncode != 0:
            log(f"creating test user {TEST_USER}")
            subprocess.run(["useradd", "-M", "-d", home, "-s", "/bin/bash", "-U", TEST_USER], check=True)
        elif p.stdout.split(":")[5] != home:
            subprocess.run(["usermod", "-d", home, TEST_USER], check=True)
        user = pwd.getpwnam(TEST_USER)
        for d in (HOME, WORK):
            d.mkdir(parents=True, exist_ok=True)
            before = d.stat().st_uid
            # The test user made again (userdel and useradd give a new uid):
            # what its former self left here is its own, or every job fails
            # with "Permission denied" on its output file. At every start:
            # the directory may be the user's already and files inside still
            # of a deleted uid (this machine's 24.11 sandbox, 2026-12-07).
            former = before if before not in (0, user.pw_uid) else None
            given = take_over(d, user.pw_uid, user.pw_gid, former)
            if given:
                log(f"{d}: gave {given} files of a former owner (uid {former}, or a uid no account has) to {TEST_USER}")
            os.chown(d, user.pw_uid, user.pw_gid)

    def install_binaries(self) -> tuple[bool, bool]:
        """The plugin, the agent and the CLI, installed like a package would
        (to a temporary name, then renamed: never over a loaded .so or a
        running binary). Whether the plugin, the agent changed.
        DASK_SPANK_PAYLOAD=<dir>: from an unpacked RPM payload instead of
        the build tree (tests/test_packaging), or from where a .deb put
        them (/usr/lib/<multiarch>/slurm-wlm/: tests/test_deb)."""
        so, agent = TARGET / "release" / "libspank_dask.so", TARGET / "release" / "dask-node-agent"
        cli = TARGET / "release" / "dask-spank"
        payload = os.environ.get("DASK_SPANK_PAYLOAD")
        if payload:
            p = Path(payload)
            so = p / "usr/lib64/slurm/spank_dask.so"
            if not so.exists():
                so = next(iter(sorted(p.glob("usr/lib/*/slurm-wlm/spank_dask.so"))), so)
            agent, cli = p / "usr/sbin/dask-node-agent", p / "usr/bin/dask-spank"
            log(f"using the binaries of the package payload in {payload}")
            for f in (so, agent, cli):
                if not f.is_file():
                    raise SandboxError(f"the payload has no {f}")
        changed = [install(src, dst) for src, dst in [
            (so, STATE / "lib" / "spank_dask.so"), (agent, BIN / "dask-node-agent"), (cli, BIN / "dask-spank")]]
        return changed[0], changed[1]

    def start_munge(self) -> None:
        (STATE / "munge").mkdir(mode=0o700, exist_ok=True)
        os.chmod(RUN / "munge", 0o755)
        os.chmod(STATE / "munge", 0o700)
        key = STATE / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munged().start()

    def start_accounting(self) -> None:
        if not self.settings.accounting:
            self.slurmdbd().stop()
            self.mariadb().stop()
            return
        data = STATE / "mariadb"
        if not (data / "mysql").is_dir():
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            with open(LOGS / "mariadb-install.log", "w") as out:
                if subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                                   "--auth-root-authentication-method=normal", "--skip-test-db"],
                                  stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise SandboxError(f"mariadb-install-db failed (see {LOGS}/mariadb-install.log)")
        self.mariadb().start()
        subprocess.run([*self.mariadb_client(), "-e",
                        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'sandbox'; "
                        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"], check=True)
        # slurmdbd reads slurmdbd.conf beside slurm.conf; it wants it
        # private to SlurmUser (root here), as it holds the database password.
        write_if_changed(ETC / "slurmdbd.conf", f"""# Generated by scripts/sandbox.py.
AuthType=auth/munge
AuthInfo=socket={MUNGE_SOCKET}
DbdHost={short_hostname()}
DbdAddr=127.0.0.1
DbdPort={DBD_PORT}
SlurmUser=root
PidFile={RUN}/slurmdbd.pid.slurm
LogFile={LOGS}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={MARIADB_PORT}
StorageUser=slurm
StoragePass=sandbox
StorageLoc=slurm_acct_db
""", 0o600)
        dbd = self.slurmdbd()
        if not dbd.running() and port_busy(DBD_PORT):
            raise SandboxError(f"port {DBD_PORT} (slurmdbd) is taken")
        dbd.start()
        self.add_associations()
        # slurmctld keeps the cluster id it got in its state; a database
        # made later (or anew) has another, which slurmctld refuses
        # ("CLUSTER ID MISMATCH"). The sandbox's state is its own: take the
        # database's.
        if not self.slurmctld().running():
            (STATE / "ctld" / "clustername").unlink(missing_ok=True)

    def add_associations(self) -> None:
        """The sandbox's cluster and, for each test user (and root), an
        account named after its primary group (the example policy's
        account=primary-group charges dask jobs there); idempotent, and
        before slurmctld starts, so that it finds its associations."""
        def listed(*args: str) -> list[str]:
            return slurm("sacctmgr", "-nP", "list", *args, check=True).split()

        def add(*args: str) -> None:
            slurm("sacctmgr", "-i", "add", *args, check=True)

        if CLUSTER not in listed("cluster", "format=cluster"):
            add("cluster", CLUSTER)
        for user in ("root", TEST_USER, OTHER_USER):
            p = subprocess.run(["id", "-gn", user], capture_output=True, text=True)
            if p.returncode != 0:
                continue  # OTHER_USER is made by the first test that needs it
            account = p.stdout.strip()
            if account not in listed("account", "format=account"):
                add("account", account, f"cluster={CLUSTER}")
            if user not in listed("assoc", f"user={user}", f"account={account}", "format=user"):
                add("user", user, f"account={account}", f"cluster={CLUSTER}")

    def node_ready(self, node: str) -> bool:
        """Idle (or busy), once a node that slurmctld drained for lacking
        GPUs (a sandbox made when its GPUs had no device files, which Slurm's
        gpu plugin drops) is resumed: its slurmd now reports them, but the
        drain would stay."""
        if "gres/gpu count reported lower" in slurm("sinfo", "-h", "-n", node, "-o", "%E"):
            slurm("scontrol", "update", f"nodename={node}", "state=resume")
        return slurm("sinfo", "-h", "-n", node, "-o", "%t").strip().split("\n")[0] in ("idle", "mix", "alloc")

    def stop_extra_nodes(self) -> None:
        """The daemons of nodes beyond the current count (after `up` with
        fewer nodes)."""
        for f in [*RUN.glob("slurmd-n*.pid"), *RUN.glob("agent-n*.pid")]:
            kind, _, node = f.stem.partition("-")
            if node[1:].isdigit() and int(node[1:]) > self.settings.nodes:
                (self.slurmd if kind == "slurmd" else self.agent)(node).stop()

    # -- down, status ---------------------------------------------------------------

    def down(self) -> None:
        """Cancel the jobs, stop every daemon the sandbox started (those of
        nodes it no longer has too); the agents stop the dask processes of
        any job still registered."""
        if self.slurmctld().running():
            ids = slurm("squeue", "-h", "-o", "%i").split()
            if ids:
                log(f"cancelling jobs: {' '.join(ids)}")
                slurm("scancel", "--full", *ids)
                try:
                    wait_for(60, "jobs to end", lambda: not slurm("squeue", "-h", "-o", "%i").strip())
                except SandboxError as e:
                    log(f"{e}: some jobs did not end")
        for f in [*RUN.glob("agent-*.pid"), *RUN.glob("slurmd-*.pid")]:
            Daemon(f.stem, [], lambda: True).stop()
        for name in ("slurmctld", "slurmdbd", "mariadb", "munged"):
            Daemon(name, [], lambda: True).stop()
        log("sandbox down")

    def status(self) -> bool:
        ok = True
        for d in self.daemons():
            if d.running():
                print(f"{d.name}: running (pid {d.pid()})")
            else:
                print(f"{d.name}: stopped")
                ok = False
        if self.slurmctld().running():
            for cmd in ("sinfo", "squeue"):
                print(slurm(cmd), end="")
        return ok


def install(src: Path, dst: Path) -> bool:
    """Install a build product; False if unchanged."""
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o755)
    tmp.replace(dst)
    return True


def counted_slurm_commands() -> Path:
    """Wrappers of the Slurm commands the node agent runs: each call
    appends a line to LOGS/agent-slurm-calls.log."""
    d = STATE / "counted-slurm"
    for cmd in ("squeue", "scontrol", "sacct"):
        real = shutil.which(cmd)
        if real:
            write_if_changed(d / cmd, f'#!/bin/sh\necho "{cmd} $*" >> {LOGS}/agent-slurm-calls.log\n'
                                      f'exec {real} "$@"\n', 0o755)
    return d


# -- the command line -----------------------------------------------------------------

USAGE = """scripts/sandbox [--slurm V] COMMAND

  up [--nodes N] [--cpus C] [--accounting on|off]
                 install what is missing, build, start (idempotent; N slurmd
                 n1..nN on one host, each with its own port and node agent,
                 declaring C cpus, default 256 so that many small jobs share
                 the 2 real cores; with or without slurmdbd and enforced
                 association limits; each kept until changed)
  down           cancel jobs, stop what `up` started
  status         what runs
  env            exports for a shell: eval "$(scripts/sandbox env)"
  shell          a shell with those exports (in the release's root for 24.11
                 and 26.05)
  run CMD...     run one command that way

V is 22.05 (default: the host's Debian bookworm packages), 24.11 (Debian
trixie) or 26.05 (Debian sid); the last two run from a Debian root made on
first use (scripts/root.sh), with their state in .sandbox/slurm-V.
DASK_SPANK_SLURM=V does the same as --slurm V. DASK_SPANK_PORT_BASE and
DASK_SPANK_TEST_USER keep two sandboxes on one machine apart."""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/sandbox", usage=USAGE, add_help=False)
    p.add_argument("command", choices=["up", "down", "status", "env", "shell", "run"])
    p.add_argument("--nodes", type=int)
    p.add_argument("--cpus", type=int)
    p.add_argument("--accounting", choices=["on", "off"])
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "run":
        os.execvpe(argv[1], argv[1:], env())
    a = p.parse_args(argv)
    try:
        if a.command == "up":
            changes = {k: v for k, v in (("nodes", a.nodes), ("cpus", a.cpus)) if v is not None}
            if a.accounting:
                changes["accounting"] = a.accounting == "on"
            Sandbox().up(**changes)
        elif a.command == "down":
            Sandbox().down()
        elif a.command == "status":
            return 0 if Sandbox().status() else 1
        elif a.command == "env":
            e = env()
            for k in ("SLURM_CONF", "DASK_SPANK_SANDBOX", "DASK_SPANK_SLURM"):
                print(f"export {k}={e[k]}")
            print(f"export PATH={VENV}/bin:{BIN}:$PATH")
        elif a.command == "shell":
            log(f"a shell with the sandbox of Slurm {SLURM_RELEASE} (exit to leave)")
            os.execvpe("bash", ["bash", "-i"], env())
    except SandboxError as e:
        log(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
