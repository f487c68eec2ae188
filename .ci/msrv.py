#!/usr/bin/env python3
"""Checks that the workspace's `rust-version` is one its dependency tree really allows.

The MSRV a user needs is the highest `rust-version` among the packages that building the
workspace's libraries pulls in (normal and build dependencies, on every feature); dev-
dependencies only build our own tests. Fails when the declared version is lower than that,
and when it is higher than needed (a stale claim either way misleads users).
"""
import json
import subprocess
import sys

meta = json.loads(subprocess.check_output(
    ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked"]))
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}

def version(text):
    return tuple(int(part) for part in (text or "0").split(".")) + (0,) * 3

# Published libraries of the workspace (the test-only facade-user crate is not one).
roots = [m for m in meta["workspace_members"] if packages[m].get("publish") != []]
seen, todo = set(), list(roots)
while todo:
    node = nodes[todo.pop()]
    for dep in node["deps"]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if kinds & {None, "build"} and dep["pkg"] not in seen:
            seen.add(dep["pkg"])
            todo.append(dep["pkg"])

needed = max(seen | set(roots), key=lambda p: version(packages[p].get("rust_version")))
need = packages[needed].get("rust_version")
declared = {packages[m].get("rust_version") for m in roots}
if len(declared) != 1:
    sys.exit(f"workspace crates declare different rust-versions: {sorted(declared)}")
declared = declared.pop()
if version(declared)[:3] != version(need)[:3]:
    sys.exit(f"rust-version is {declared}, but the dependency tree needs {need} "
             f"({packages[needed]['name']} {packages[needed]['version']}): set it to {need}")
print(f"rust-version {declared}: what the dependency tree needs ({packages[needed]['name']})")
