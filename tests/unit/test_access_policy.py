"""The access policy's roles and refusals (pool.cluster.access), over fake connection contexts."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pool.cluster.access import ADMIN, USER, USER_METHODS, AccessPolicy
from pool.cluster.config import load_config
from pool.errors import PermissionDenied, SpecError

POLICY = AccessPolicy(admin_gid=50, users_gid=100)


def unix(uid: int, gid: int = 1000, groups: tuple[int, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(transport="unix", uid=uid, gid=gid, groups=groups)


@pytest.mark.parametrize("ctx, role", [
    (unix(0), ADMIN),                                   # root
    (unix(1000, groups=(50,)), ADMIN),                  # admin group, supplementary
    (unix(1000, gid=50), ADMIN),                        # admin group, primary
    (unix(1000, groups=(7, 100)), USER),
    (unix(1000, groups=(7,)), None),
    (SimpleNamespace(transport="tcp", uid=None, gid=None, groups=()), ADMIN),  # token (and TLS) passed
])
def test_roles(ctx, role):
    assert POLICY.role(ctx) == role


def test_users_may_call_only_their_methods_and_others_nothing():
    user = unix(1000, groups=(100,))
    assert all(POLICY.check(m, user) == USER for m in USER_METHODS)
    for method in ("stats", "set_warm", "push", "fork", "nodes"):
        with pytest.raises(PermissionDenied, match=f"only the admins may call {method}") as e:
            POLICY.check(method, user)
        assert e.value.data == {"method": method, "uid": 1000}
    with pytest.raises(PermissionDenied, match="uid 1001 is neither root nor in"):
        POLICY.check("ping", unix(1001))
    assert AccessPolicy().role(unix(1000, groups=(100,))) is None      # no groups: root only
    assert not AccessPolicy().shared and POLICY.shared


def test_a_user_acts_only_on_its_own_copies():
    POLICY.check_owner({"id": "abc", "owner": 1000}, unix(1000), "kill")
    for owner in (1001, None):
        with pytest.raises(PermissionDenied, match="instance abc was not spawned by uid 1000"):
            POLICY.check_owner({"id": "abc", "owner": owner}, unix(1000), "kill")


def test_groups_in_the_config_must_exist(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[service]\nadmin_group = "root"\nusers_group = "no-such-group-here"\n')
    with pytest.raises(SpecError, match="no group named 'no-such-group-here'") as e:
        load_config(f)
    assert e.value.field == "service.users_group"
    f.write_text('[service]\nadmin_group = "root"\n')
    assert load_config(f).access == AccessPolicy(admin_gid=0)
