"""The guides match the binaries: every command and option they show
exists, and the admin guide's policy table lists exactly the keys the
parser knows, in its order, with the defaults the binaries apply."""
from __future__ import annotations

import re
import subprocess

import sandboxlib as sb

ADMIN = (sb.REPO / "docs" / "admin.md").read_text()
USER = (sb.REPO / "docs" / "user.md").read_text()


def helptext(*cmd: str) -> str:
    return subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout


def code(doc: str) -> str:
    """The code of a document: its fenced blocks and its code spans."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", doc, re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", doc, flags=re.M | re.S))
    return "\n".join(blocks + spans)


def shown(doc: str, program: str) -> dict[str, set[str]]:
    """Subcommand -> options, as the document shows them (code spans and
    blocks)."""
    out: dict[str, set[str]] = {}
    # Where a line of code (or a code span) runs the program.
    for m in re.finditer(rf"^\s*(?:\$ |sudo )?{re.escape(program)} ([a-z][a-z-]*)((?:[^`\n#])*)", code(doc), re.M):
        sub, rest = m.group(1), m.group(2)
        out.setdefault(sub, set()).update(re.findall(r"(--[a-z][a-z-]*)", rest))
    return out


def check_program(doc: str, program: str, binary: str) -> None:
    top = helptext(binary)
    for sub, flags in shown(doc, program).items():
        if sub in ("attach",) and program == "dask-spank":
            continue
        assert re.search(rf"^  {sub}\b", top, re.M), f"{program} {sub}: no such command"
        h = helptext(binary, sub)
        for f in flags:
            assert f in h, f"{program} {sub} {f}: not an option of {binary} {sub}"


def test_every_agent_command_and_option_in_the_admin_guide_exists():
    check_program(ADMIN, "dask-node-agent", str(sb.BIN / "dask-node-agent"))


def test_every_user_command_and_option_in_the_guides_exists():
    check_program(USER, "dask-spank", str(sb.BIN / "dask-spank"))
    check_program(ADMIN, "dask-spank", str(sb.BIN / "dask-spank"))


def test_the_policy_table_lists_the_parsers_keys_in_order():
    src = (sb.REPO / "common" / "src" / "config.rs").read_text()
    keys = re.findall(r'"([a-z_]+)",', src[src.index("pub const KEYS"):src.index("];", src.index("pub const KEYS"))])
    table = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", ADMIN, re.M)
    assert [k for k, _ in table] == keys


def test_the_policy_tables_defaults_are_the_binarys():
    """The defaults column is what the binaries apply to a bare line
    (check-config prints every key of the line, "(default)" where the line
    does not set it)."""
    conf = sb.STATE / "etc" / "bare-plugstack.conf"
    conf.write_text("required /usr/lib64/slurm/spank_dask.so\n")
    out = subprocess.run([str(sb.BIN / "dask-node-agent"), "check-config", "--plugstack", str(conf), "--login-node"],
                         capture_output=True, text=True, env=sb.ENV, timeout=60).stdout
    applied = dict(re.findall(r"^  ([a-z_]+) +(\S+)  \(default\)$", out, re.M))
    table = dict(re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", ADMIN, re.M))
    assert len(applied) >= 30 and applied == table, (out, table)
