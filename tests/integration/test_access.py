"""Who may use the unix socket: roles from the caller's kernel credentials (pool.cluster.access), with a
real `pool serve` and clients that really run as other uids and groups."""
from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ADMINS, USERS = "staff", "users"   # groups every Debian has; no account is created
ALICE, BOB, MALLORY, OPS = 20001, 20002, 20003, 20004

# Runs as root until it has imported the client, then becomes UID with GROUPS and makes the calls
# (reading nothing from disk after that); prints each call's result or error code as JSON.
AS_USER = r"""
import json, os, sys
from pool.client import Client
from pool.errors import PoolError
uid, groups, socket, calls = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
os.setgroups(groups); os.setgid(groups[0] if groups else 65534); os.setuid(uid)
out = []
with Client(socket) as c:
    for method, params in calls:
        try:
            r = c.call(method, params, 30)
            out.append({"ok": r})
        except PoolError as e:
            out.append({"error": e.code, "message": e.message})
print(json.dumps(out))
"""


def as_user(svc, uid: int, groups: list[str], *calls) -> list[dict]:
    gids = [grp.getgrnam(g).gr_gid for g in groups]
    # the socket's dir is the test's private one: reach it through an fd opened as root
    dirfd = os.open(svc.socket.parent, os.O_PATH)
    try:
        res = subprocess.run([sys.executable, "-c", AS_USER, str(uid), json.dumps(gids),
                              f"/proc/self/fd/{dirfd}/{svc.socket.name}", json.dumps(calls)],
                             pass_fds=(dirfd,), capture_output=True, text=True, timeout=60, check=False)
    finally:
        os.close(dirfd)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_admins_users_and_everyone_else(service, tmp_path):
    os.chmod(tmp_path, 0o755)   # the socket itself decides, not its directory
    svc = service(f'[service]\nadmin_group = "{ADMINS}"\nusers_group = "{USERS}"\n'
                  "[templates.py-hello]\nmin_warm = 1\nmax_live = 8\n")
    assert stat.S_IMODE(svc.socket.stat().st_mode) == 0o666

    spawn = ["spawn", {"template": "py-hello", "timeout": 30.0, "owner": 0}]  # a forged owner is replaced
    [alice_spawn, alice_list] = as_user(svc, ALICE, [USERS], spawn, ["list", {}])
    copy = alice_spawn["ok"]["id"]
    assert [r["id"] for r in alice_list["ok"]] == [copy]
    assert alice_list["ok"][0]["owner"] == ALICE

    bob = as_user(svc, BOB, [USERS], ["list", {}], ["info", {"id": copy}], ["kill", {"id": copy}],
                  ["stats", {}], ["set_warm", {"template": "py-hello", "min_warm": 0}],
                  ["templates", {}])
    assert bob[0] == {"ok": []}                                     # sees none of Alice's copies
    assert [r.get("error") for r in bob[1:5]] == ["permission_denied"] * 4
    assert f"instance {copy} was not spawned by uid {BOB}" in bob[2]["message"]
    assert "only the admins may call stats" in bob[3]["message"]
    assert "py-hello" in {t["name"] for t in bob[5]["ok"]}          # templates are readable

    mallory = as_user(svc, MALLORY, [], ["ping", {}], ["list", {}])
    assert [r.get("error") for r in mallory] == ["permission_denied"] * 2
    assert f"uid {MALLORY} is neither root nor in the service's admin or users group" in mallory[0]["message"]

    ops = as_user(svc, OPS, [ADMINS], ["list", {}], ["stats", {}])
    assert [r["id"] for r in ops[0]["ok"]] == [copy] and ops[1]["ok"]["live"] == 1

    # running-instance methods: on one's own copies only; migrate (it picks nodes) is the admins'
    bob_live = as_user(svc, BOB, [USERS], ["checkpoint", {"id": copy}], ["snapshots", {"id": copy}],
                       ["migrate", {"id": copy, "node": "local"}])
    assert [r.get("error") for r in bob_live] == ["permission_denied"] * 3
    [alice_snaps] = as_user(svc, ALICE, [USERS], ["snapshots", {"id": copy}])
    assert alice_snaps == {"ok": []}

    [alice_kill] = as_user(svc, ALICE, [USERS], ["kill", {"id": copy, "grace": 0}])
    assert alice_kill["ok"]["end_cause"] == "killed" and alice_kill["ok"]["owner"] == ALICE
    with svc.client() as c:                                         # root: everything, owner shown
        assert c.info(copy)["owner"] == ALICE
        assert c.list() == []


def test_without_groups_the_socket_is_for_root_and_its_group_only(service):
    svc = service()
    assert stat.S_IMODE(svc.socket.stat().st_mode) == 0o660
    with svc.client() as c:
        inst = c.spawn("py-hello")
        assert c.info(inst.id)["owner"] == 0                        # root spawned it
        inst.kill(grace=0)
