"""The Java and Node SDKs serve a running copy's checkpoint hooks, through a real `pool serve` and real
CRIU: a checkpoint runs the app's before- and after-checkpoint hooks in the copy, a rollback finishes
the checkpoint in the restored process, and a hook that throws fails the checkpoint while the copy runs
on. The apps (tests/apps/java-sdk, tests/apps/node-sdk) report the hooks that ran on GET /."""
from __future__ import annotations

import pytest
from test_live import ask

from pool.errors import CheckpointError

TEMPLATE_HOOKS = ["before"]  # the template's checkpoint, in every copy's history


@pytest.fixture(params=["java-sdk", "node-sdk"])
def sdk(request, service):
    """(template, client) for a service that runs the SDK app's template."""
    template = request.param
    request.getfixturevalue(template.replace("-", "_"))  # built once per module (conftest.py)
    with service(f"[templates.{template}]\nmin_warm = 1\nmax_live = 2\n").client() as c:
        yield template, c


def test_checkpoint_runs_the_hooks_and_rollback_finishes_them_in_the_restored_process(sdk):
    template, c = sdk
    inst = c.spawn(template)
    assert ask(inst.address)["checkpointHooks"] == TEMPLATE_HOOKS

    r = c.checkpoint(inst.id, tag="hooked")
    assert r["hooks"] == "ran"
    after = ask(inst.address)
    assert after["instance"] == inst.id
    assert after["checkpointHooks"] == [*TEMPLATE_HOOKS, "before", "after"]  # in the running copy

    old_pid = c.info(inst.id)["pid"]
    rb = c.rollback(inst.id, "hooked")
    assert rb["hooks"] == "ran" and rb["pid"] != old_pid
    back = ask(inst.address)
    # dumped between its before and after hooks: the restored process ran after_checkpoint itself
    assert back["checkpointHooks"] == [*TEMPLATE_HOOKS, "before", "after"]
    assert back["instance"] == inst.id

    again = c.checkpoint(inst.id)  # the restored process serves its channel too
    assert again["hooks"] == "ran"
    assert ask(inst.address)["checkpointHooks"] == [*TEMPLATE_HOOKS, "before", "after", "before", "after"]
    c.kill(inst.id, grace=0)


def test_a_throwing_before_checkpoint_hook_fails_the_checkpoint_and_the_copy_runs_on(sdk):
    template, c = sdk
    inst = c.spawn(template, env={"FAIL_CHECKPOINT_HOOK": "1"})
    with pytest.raises(CheckpointError) as e:
        c.checkpoint(inst.id)
    assert f"{template} refuses: FAIL_CHECKPOINT_HOOK is set" in e.value.message
    assert "before_checkpoint" in e.value.message and "still runs" in e.value.message
    assert c.snapshots(inst.id) == []                       # nothing was dumped
    a = ask(inst.address)
    assert a["instance"] == inst.id and a["checkpointHooks"] == TEMPLATE_HOOKS
    assert c.info(inst.id)["state"] == "running"
    c.kill(inst.id, grace=0)
