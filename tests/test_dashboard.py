"""verl_ext.dashboard: the saved wandb view is built offline with every panel the paper's figures need."""

from __future__ import annotations

from verl_ext.dashboard import DASHBOARD_SECTIONS, build_workspace, dashboard_metric_keys, main


def test_workspace_has_every_section_and_panel_key():
    workspace = build_workspace("someone", "dapo_reweight")
    assert (workspace.entity, workspace.project) == ("someone", "dapo_reweight")
    assert [s.name for s in workspace.sections] == [name for name, _ in DASHBOARD_SECTIONS]
    plotted = [key for s in workspace.sections for p in s.panels for key in p.y]
    assert plotted == dashboard_metric_keys()
    for key in ("actor/reweight/weight_mean", "rollout/top_p_truncated_mass_mean", "actor/entropy"):
        assert key in plotted, key


def test_print_lists_the_layout_without_contacting_wandb(capsys):
    main(["--entity", "someone", "--print"])
    out = capsys.readouterr().out
    assert out.count("## ") == len(DASHBOARD_SECTIONS)
    for key in dashboard_metric_keys():
        assert key in out, key


def test_print_needs_no_entity(capsys, monkeypatch):
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    main(["--print"])
    assert capsys.readouterr().out.count("## ") == len(DASHBOARD_SECTIONS)


def test_saving_without_entity_is_a_one_line_error(capsys, monkeypatch):
    import pytest

    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--project", "p"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "[dashboard] error: --entity is not set; valid: a wandb user or team (or set WANDB_ENTITY), "
        "or --print to list the layout offline")
