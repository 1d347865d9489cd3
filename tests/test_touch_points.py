"""Every runtime touch point on verl / TransferQueue / torch / transformers / vLLM / wandb internals
(`verl_ext.touch_points`) still has the shape our code relies on. A failure names the touch point,
the module of ours that uses it, what we expect against what is installed, and the version the
entry was written for: the place to look after an upgrade."""

from __future__ import annotations

import pytest

from verl_ext.touch_points import TOUCH_POINTS, WRITTEN_FOR, installed_version, report


@pytest.mark.parametrize("tp", TOUCH_POINTS, ids=[tp.target for tp in TOUCH_POINTS])
def test_touch_point_holds(tp):
    if tp.optional and installed_version(tp.package) is None:
        pytest.skip(f"{tp.package} is not installed")
    broken = report(tp)
    assert not broken, broken


def test_every_entry_is_complete():
    for tp in TOUCH_POINTS:
        assert tp.package in WRITTEN_FOR, f"{tp.target}: no version recorded for {tp.package}"
        assert (":" in tp.target or tp.kind == "module") and tp.used_by and tp.why, f"{tp.target}: incomplete"
        assert tp.kind in ("callable", "class", "mapping", "module"), f"{tp.target}: unknown kind {tp.kind}"


def test_a_changed_touch_point_fails_loudly():
    from dataclasses import replace

    tp = next(t for t in TOUCH_POINTS if t.target.endswith("compute_policy_loss_vanilla"))
    message = report(replace(tp, params=(*tp.params, "renamed_in_a_new_verl")))
    assert "compute_policy_loss_vanilla" in message and "renamed_in_a_new_verl" in message
    assert "verl_ext/policy_loss.py" in message and "Written for verl 0.9.1" in message
    assert "not found" in report(replace(tp, target="verl.trainer.ppo.core_algos:no_such_function"))
