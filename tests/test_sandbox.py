"""The sandbox library (scripts/sandbox.py): its configuration is what its
settings say, the running sandbox uses it, and bad settings are refused in
one line naming the setting."""
from __future__ import annotations

import os

import pytest

import sandbox as box
import sandboxlib as sb


def test_the_running_sandbox_has_the_configuration_its_settings_render():
    s = box.Settings.load()
    assert (box.ETC / "slurm.conf").read_text() == box.slurm_conf(s)
    assert (box.ETC / "plugstack.conf").read_text() == box.plugstack_conf(s)
    # Every node the settings name is up, with its own slurmd port.
    up = sb.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split("\n")  # a line per partition
    assert sorted({l.split()[0] for l in up if l}) == s.node_names(), up
    for i, n in enumerate(s.node_names(), 1):
        assert f"NodeName={n} NodeAddr=127.0.0.1 Port={box.slurmd_port(i)} CPUs={s.cpus}" in box.slurm_conf(s)


def test_policy_keys_merge_site_then_tests_and_a_later_key_wins_in_place():
    keys = box.policy_keys(box.Settings(site="worker_cpus=1 tls=on worker_mem=1G", policy="tls=off extra=1"))
    assert keys[:2] == [f"agent_dir={box.AGENT_DIR}", f"attach_cmd={box.BIN}/dask-spank"]
    assert keys[2:] == ["worker_cpus=1", "tls=off", "worker_mem=1G", "extra=1"]
    # No site keys at all, and the default: the example site policy's.
    assert box.policy_keys(box.Settings(site=""))[2:] == []
    assert "account=primary-group" in box.policy_keys(box.Settings())
    include = box.Settings(plugstack_include="/etc/slurm/plugstack.conf.d")
    assert box.plugstack_conf(include) == "include /etc/slurm/plugstack.conf.d/*.conf\n"


def test_accounting_and_the_health_check_are_in_what_slurm_reads():
    on = box.slurm_conf(box.Settings(accounting=True))
    assert f"AccountingStoragePort={box.DBD_PORT}" in on and "accounting_storage/slurmdbd" in on
    assert "accounting_storage/none" in box.slurm_conf(box.Settings())
    assert "exit 0" in box.health_check_script(box.Settings(health_check=False))
    assert " health --agent-dir " in box.health_check_script(box.Settings())


@pytest.mark.parametrize("bad, says", [(dict(nodes=0), "nodes=0: want a number from 1 to 99"),
                                       (dict(cpus=10000), "cpus=10000: want a number from 1 to 9999")])
def test_bad_settings_are_refused_before_anything_changes(bad, says):
    before = (box.ETC / "sandbox.json").read_text()
    with pytest.raises(box.SandboxError) as e:
        box.Sandbox().up(**bad)
    assert str(e.value) == says
    assert (box.ETC / "sandbox.json").read_text() == before


def test_an_up_that_fails_says_why_and_keeps_the_settings_that_worked():
    """A second node whose slurmd port is taken never comes up: `up` fails
    naming the node, Slurm's word on it and slurmd's last error, and the
    kept settings stay those of the sandbox that worked, so that the next
    `up` (the next test's) brings that sandbox back instead of failing the
    same way."""
    import socket

    box.Sandbox().up(nodes=1)
    before = (box.ETC / "sandbox.json").read_text()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", box.slurmd_port(2)))
        taken.listen()
        with pytest.raises(box.SandboxError) as e:
            box.Sandbox().up(nodes=2)
    said = str(e.value)
    assert "\n" not in said and "node n2 is not up (sinfo: " in said, said
    assert "slurmd's last error: " in said and "slurmd-n2.log" in said, said
    assert (box.ETC / "sandbox.json").read_text() == before
    box.Sandbox().up(policy=box.Settings.load().policy)
    assert box.Settings.load().nodes == 1
    assert not box.Sandbox().slurmd("n2").running() and not box.Sandbox().agent("n2").running()
    test_the_running_sandbox_has_the_configuration_its_settings_render()


def test_take_over_gives_a_deleted_uids_files_and_stays_out_of_mounts(tmp_path):
    """What a deleted uid left under a directory already the test user's is
    given to the user (the 24.11 sandbox's state on 2026-12-07: every job
    failed on its output file); a mount point inside (a user's FUSE mount in
    test_hungfs) is neither looked at nor entered."""
    import pwd
    import subprocess

    gone = next(u for u in range(4_000_000, 4_001_000) if not any(p.pw_uid == u for p in pwd.getpwall()))
    user = pwd.getpwnam(box.TEST_USER)
    inside = tmp_path / "log" / "old"
    inside.mkdir(parents=True)
    (inside / "job.log").write_text("x")
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], check=True)
    try:
        (mount / "theirs").write_text("y")
        for p in (tmp_path / "log", inside, inside / "job.log", mount, mount / "theirs"):
            os.lchown(p, gone, gone)
        assert box.take_over(tmp_path, user.pw_uid, user.pw_gid) == 3
        for p in (tmp_path / "log", inside, inside / "job.log"):
            assert (p.stat().st_uid, p.stat().st_gid) == (user.pw_uid, user.pw_gid), p
        # The mount's root and what it holds: untouched.
        assert mount.stat().st_uid == gone and (mount / "theirs").stat().st_uid == gone
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
