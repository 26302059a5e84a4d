"""The user guide's Python examples run as written (docs/user.md), as the
test user, on the sandbox: the notebook's first example verbatim, its async
one inside an event loop, and the two ways to connect."""
from __future__ import annotations

import json
import os
import re
import textwrap

import sandboxlib as sb
from test_keeper import ds

GUIDE = (sb.REPO / "docs" / "user.md").read_text()


def section(title: str) -> str:
    start = GUIDE.index(f"\n## {title}\n")
    end = GUIDE.find("\n## ", start + 1)
    return GUIDE[start:end if end > 0 else None]


def python_blocks(title: str) -> list[str]:
    """The ```python blocks of a section, dedented (a block may sit in a
    list item)."""
    return [textwrap.dedent(b) for b in re.findall(r"^ *```python\n(.*?)^ *```", section(title), re.M | re.S)]


def run(program: str, timeout: float = 600):
    return sb.as_user([str(sb.VENV / "bin" / "python"), "-c", program], check=False, timeout=timeout)


def gone(name: str) -> bool:
    return not sb.run(["squeue", "-h", "-u", sb.TEST_USER, "-n",
                       f"dask-scheduler-{name},dask-worker-{name}"]).stdout.strip()


def test_the_notebooks_first_example_runs_as_written():
    first = python_blocks("A notebook")[0]
    assert 'SpankCluster("ana", workers=20' in first, first
    sb.forget_cluster("ana")
    try:
        # As written, and what its bare expressions would show in a notebook.
        r = run(first + "\nprint('link', cluster.dashboard_link)\n")
        assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
        mean = float(r.stdout.split()[0])
        assert abs(mean - 0.5) < 0.01, r.stdout
        assert "token=" in r.stdout, r.stdout
        # cluster.close() is dask-spank down: every job cancelled.
        sb.wait_until("the cluster's jobs gone", lambda: gone("ana"), 120)
    finally:
        ds("down", "ana", check=False)


def test_the_async_example_runs_in_an_event_loop():
    first, async_example = python_blocks("A notebook")[:2]
    assert "async with SpankCluster" in async_example, async_example
    imports = "\n".join(l for l in first.splitlines() if l.startswith(("from ", "import ")))
    program = (f"import asyncio\n{imports}\n\nasync def main():\n{textwrap.indent(async_example, '    ')}"
               "\n    print('done')\n\nasyncio.run(main())\n")
    sb.forget_cluster("ana")
    try:
        r = run(program)
        assert r.returncode == 0 and "done" in r.stdout, (program, r.stdout, r.stderr[-3000:])
        sb.wait_until("the cluster's jobs gone", lambda: gone("ana"), 120)
    finally:
        ds("down", "ana", check=False)


def test_both_ways_to_connect_work():
    package, plain = python_blocks("Connect")[:2]
    assert 'dask_spank.connect("ana")' in package and "Security(" in plain, (package, plain)
    # The guide's home is an example: the test user's own.
    plain = plain.replace("/home/you/.dask-spank", str(sb.HOME / ".dask-spank"))
    sb.forget_cluster("ana")
    ds("up", "ana", "--workers", "1", "--wait", "100", "--timeout", "180")
    try:
        for program in (package, plain):
            r = run(program + "\nprint('sum', client.submit(sum, [1, 2]).result())\nclient.close()\n")
            assert r.returncode == 0 and "sum 3" in r.stdout, (program, r.stdout, r.stderr[-3000:])
    finally:
        ds("down", "ana", check=False)


# The guide's sizes are a site's; the sandbox has two small nodes. Each
# substitution must still match the guide (a changed example fails here,
# rather than going untested).
SANDBOX_SCALE = {
    "--array=1-100": "--array=1-2",
    "--workers 100 --worker-mem 3G --wait 80": "--workers 2 --worker-mem 1G --wait 100 --timeout 240",
    "wait ana --percent 80": "wait ana --percent 100 --timeout 240",
    "scale ana 200": "scale ana 3",
    "adapt ana 0 200": "adapt ana 0 3",
    " [--job 1234_7] [--follow]": "",
    "--workers 20 --worker-mem 6G": "--workers 20 --worker-mem 1G",
    "~/envs/analysis": str(sb.VENV),
}


def shell_blocks() -> list[list[str]]:
    """Every ```sh block of the guide: its commands without comments, at the
    sandbox's scale."""
    blocks = []
    used = set()
    for b in re.findall(r"^```sh\n(.*?)^```", GUIDE, re.M | re.S):
        for old, new in SANDBOX_SCALE.items():
            if old in b:
                used.add(old)
                b = b.replace(old, new)
        blocks.append([l.split("  #")[0].strip() for l in b.splitlines()
                       if l.strip() and not (l.startswith("#") and not l.startswith("#!"))
                       or l.startswith("#SBATCH")])
    assert used == set(SANDBOX_SCALE), f"examples changed: {set(SANDBOX_SCALE) - used} no longer in the guide"
    return blocks


def sh(line: str):
    r = sb.as_user(["bash", "-c", line], check=False, timeout=600)
    assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def test_every_shell_example_runs_as_written_at_the_sandboxs_scale():
    sbatches, commands, inspect, stop, script = shell_blocks()
    assert sbatches[0].startswith("sbatch --dask-role=scheduler") and stop[0].startswith("scancel"), (sbatches, stop)
    assert script[0] == "#!/bin/bash" and script[-1] == "exec dask-spank attach", script
    sb.forget_cluster("ana")
    try:
        # Plain sbatch, then the guide's way to stop.
        for line in sbatches:
            assert re.search(r"Submitted batch job \d+", sh(line)), line
        ds("wait", "ana", "--percent", "100", "--timeout", "240")
        sh(stop[0])
        sb.wait_until("the scancelled cluster gone", lambda: gone("ana"), 120)
        # The dask-spank walk-through, each line as written.
        outputs = {}
        for line in commands:
            outputs[line.split()[1]] = sh(line)
        assert "ana" in outputs["ls"] and "scheduler" in outputs["status"], outputs
        assert gone("ana"), "dask-spank down left jobs"
        # What the site allows and what a start would submit.
        assert "worker" in sh(inspect[0])
        assert "sbatch" in sh(inspect[1]) and gone("ana")
        # The own job script: a worker of a cluster started with plain
        # sbatch (a kept cluster's keeper would cancel a worker over its
        # target).
        sb.sbatch("--dask-role=scheduler", "--dask-cluster=ana")
        (sb.HOME / "worker.sh").write_text("\n".join(script) + "\n")
        os.chown(sb.HOME / "worker.sh", sb.user().pw_uid, sb.user().pw_gid)
        assert re.search(r"Submitted batch job \d+", sh(f"cd && sbatch {sb.HOME / 'worker.sh'}"))
        sb.wait_until("the script's worker connected",
                      lambda: json.loads(ds("status", "ana", "--json").stdout)["connected"] == 1, 240, 2)
    finally:
        ds("down", "ana", check=False)


def test_the_options_example_gives_every_option_to_the_jobs():
    """The guide's example of every job and dask option, as written, planned
    (job_script: `up --dry-run`, the site's policy applied) rather than
    submitted: the sandbox has no reservation `ana` nor a GPU. Every job
    option is on the sbatch line of the job it belongs to."""
    options = python_blocks("A notebook")[2]
    assert options.startswith('SpankCluster("ana", workers=8'), options
    # Not started: an asynchronous cluster starts when awaited.
    made = "cluster = " + options.replace('SpankCluster("ana",', 'SpankCluster("ana", asynchronous=True,', 1)
    program = ("import asyncio\nfrom dask_spank import SpankCluster\n\nasync def main():\n"
               + textwrap.indent(made + "\nprint(cluster.job_script())\n", "    ")
               + "\nasyncio.run(main())\n")
    # A site that charges dask jobs to their users' own account would refuse
    # account="phys" (as the sandbox's does): a site-neutral line.
    sb.set_site("")
    try:
        r = run(program, timeout=120)
    finally:
        sb.set_site(None)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    scheduler, workers = r.stdout.strip().splitlines()
    for opt in ("--partition=htc", "--account=phys", "--qos=normal", "--constraint=avx512", "--gres=gpu:1",
                "--mem=6G", "--cpus-per-task=2", "--time=4:00:00", "--reservation=ana"):
        assert opt in workers, (opt, workers)
    assert "--comment=ana" in scheduler and "--comment=ana" not in workers, (scheduler, workers)
    assert "--account=phys" in scheduler, scheduler
    # (env_vars and the dask worker options travel in the jobs' environment,
    # not on the sbatch line: test_notebook's
    # test_sbatch_and_dask_worker_options_from_python_are_kept sees them in
    # running workers.)


def test_the_personal_defaults_file_sizes_a_new_cluster():
    """The guide's `dask-spank:` section of dask's configuration, as written
    (its environment path made the sandbox's), in the user's
    ~/.config/dask: a new cluster's plan (job_script) has its values."""
    guide_yaml = [textwrap.dedent(b) for b in re.findall(r"^ *```yaml\n(.*?)^ *```", section("A notebook"), re.M | re.S)
                  if "worker-mem: 6G" in b][0]
    assert "env: /home/u/envs/analysis" in guide_yaml, guide_yaml
    conf_dir = sb.HOME / ".config" / "dask"
    conf = conf_dir / "dask-spank-guide.yaml"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text(guide_yaml.replace("/home/u/envs/analysis", str(sb.VENV)))
    for p in (sb.HOME / ".config", conf_dir, conf):
        os.chown(p, sb.user().pw_uid, sb.user().pw_gid)
    program = ("import asyncio\nfrom dask_spank import SpankCluster\n\nasync def main():\n"
               "    print(SpankCluster('ana', workers=1, asynchronous=True).job_script())\n\nasyncio.run(main())\n")
    try:
        r = run(program, timeout=120)
    finally:
        conf.unlink()
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    scheduler, workers = r.stdout.strip().splitlines()
    for opt in ("--mem=6G", "--cpus-per-task=2", "--time=4:00:00", f"--dask-env={sb.VENV}"):
        assert opt in workers, (opt, workers)
    assert "--mem=2G" in scheduler and f"--dask-env={sb.VENV}" in scheduler, scheduler
