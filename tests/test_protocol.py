"""The Python side of the node agent's protocol against the Rust types.

docs/agent-protocol.schema.json is generated from the agent's types
(`dask-node-agent schema`; a node-agent unit test fails while the file is
not what the types make). Here every message the Python side writes is
checked against it: the ones the builders make (agentproto, the bench's
registration with its copy of the default policy) are validated in full,
and every message literal in the tests and scripts is checked field by
field. So a field of JobSpec or of a request renamed, added or removed in
Rust fails here until the Python side follows.
"""
from __future__ import annotations

import ast
import json
import os
import pwd
from pathlib import Path

import jsonschema
import pytest

import agentproto

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "docs" / "agent-protocol.schema.json").read_text())
# Where the Python side writes messages to the agent.
SOURCES = sorted([*REPO.glob("tests/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("python/dask_spank/*.py")])
# Literals that break the protocol on purpose (a test of the agent's
# refusal) say so on their line.
ON_PURPOSE = "# malformed on purpose"


def validate(kind: str, message: dict) -> None:
    """Validate the message as it goes on the wire (JSON: tuples are arrays)."""
    wire = json.loads(json.dumps(message))
    jsonschema.validate(wire, SCHEMA[kind], cls=jsonschema.Draft202012Validator)


def variants(kind: str) -> dict[str, dict]:
    """The schema of each message type of `kind` (request, session,
    response): its object schema, by its `type` (following the `$ref`s of
    the request, an attach or a control request)."""
    schema, out = SCHEMA[kind], {}

    def walk(s: dict) -> None:
        if "$ref" in s:
            walk(schema["$defs"][s["$ref"].rsplit("/", 1)[1]])
        for v in s.get("oneOf", []) + s.get("anyOf", []):
            walk(v)
        if "const" in s.get("properties", {}).get("type", {}):
            out[s["properties"]["type"]["const"]] = s

    walk(schema)
    return out


def test_the_schema_is_of_the_version_the_python_side_speaks():
    assert SCHEMA["protocol_version"] == agentproto.VERSION
    validate("hello", agentproto.hello("test"))
    with pytest.raises(jsonschema.ValidationError):
        validate("hello", {"version": agentproto.VERSION, "client": "test", "extra": 1})


def test_the_builders_messages_are_valid():
    validate("request", agentproto.attach_request(12, "/home/u/.dask-spank/clusters/ana"))
    validate("request", agentproto.attach_request(12, "/c", env=[["A", "1"]], cwd="/tmp",
                                                  extra={"reattach": True, "forkserver_fd": True}))
    with pytest.raises(jsonschema.ValidationError):
        validate("request", agentproto.attach_request(12, "/c", extra={"log_fd": 3}))
    # What an attached connection sends is a session message, no opening.
    address = {"type": "scheduler_address", "address": "tls://127.0.0.1:8786"}
    validate("session", address)
    with pytest.raises(jsonschema.ValidationError):
        validate("request", address)


def test_the_bench_registers_jobs_as_the_plugin_does():
    """scripts/bench_control.py registers 3000 jobs with its own copy of the
    default policy: the registration and the policy are the agent's."""
    import bench_control

    me = pwd.getpwuid(os.getuid())
    spec = bench_control.spec(1, me, os.getpid())
    validate("request", spec)
    # The check can fail: a field the agent does not know, one missing.
    with pytest.raises(jsonschema.ValidationError):
        validate("request", {**spec, "stepd": 1})
    with pytest.raises(jsonschema.ValidationError):
        validate("request", {k: v for k, v in spec.items() if k != "stepd_pid"})
    with pytest.raises(jsonschema.ValidationError):
        validate("request", {**spec, "policy": {**spec["policy"], "max_workers": 3}})


def message_literals():
    """Every dict literal with a constant `type` in the Python sources:
    (file, line, type, its constant keys, whether it spreads another dict)."""
    for path in SOURCES:
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Dict):
                continue
            keys = [k.value if isinstance(k, ast.Constant) else k for k in node.keys]
            if "type" not in keys:
                continue
            value = node.values[keys.index("type")]
            if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                continue
            if ON_PURPOSE in lines[node.lineno - 1]:
                continue
            constant = {k for k in keys if isinstance(k, str)}
            yield path.relative_to(REPO), node.lineno, value.value, constant, None in keys


def test_every_message_literal_has_the_fields_of_its_type():
    kinds = [variants("request"), variants("session"), variants("response")]
    assert {"attach", "register", "ping"} <= set(kinds[0]) and "scheduler_address" in kinds[1]
    seen, wrong = 0, []
    for where, line, kind, keys, spreads in message_literals():
        candidates = [k[kind] for k in kinds if kind in k]
        if not candidates:
            wrong.append(f"{where}:{line}: no message of type {kind!r} in the protocol")
            continue
        seen += 1
        problems = []
        for v in candidates:
            unknown = keys - set(v["properties"])
            missing = set() if spreads else set(v.get("required", [])) - keys
            if not unknown and not missing:
                break
            problems.append(f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        else:
            wrong.append(f"{where}:{line}: {kind}: " + "; ".join(problems))
    assert not wrong, "\n".join(wrong)
    # The scan sees the messages (attach, register, job_end, status, ping).
    assert seen >= 10, seen
