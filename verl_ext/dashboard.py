"""The wandb dashboard for DAPO-reweight runs, built with wandb's own `wandb-workspaces` library.

    python -m verl_ext.dashboard --entity ENTITY --project dapo_reweight            # create / update
    python -m verl_ext.dashboard --print                                             # show, no network

One section per question the paper's figures answer: does reward / validation Avg@k rise,
how long are responses, how does entropy move, what does the weighting hook do, how far a
top-p rollout is off-policy, and is optimisation healthy. Runs are grouped by wandb group
(scripts/run_baselines.sh and run_top_p_ablation.sh put each comparison in one group).
"""

from __future__ import annotations

import argparse
import os

from verl_ext.core.checks import ConfigError, exit_on_config_error

# (section, [(panel title, metric keys, metric regex or None)]) — keys as verl and our hook log them.
DASHBOARD_SECTIONS: list[tuple[str, list[tuple[str, list[str], str | None]]]] = [
    (
        "Reward and validation accuracy",
        [
            ("Training reward (score, after overlong penalty)", ["critic/score/mean", "critic/rewards/mean"], None),
            ("Validation accuracy (Avg@k per data set)", [], r"val-core/.*/acc/mean@.*"),
        ],
    ),
    (
        "Responses",
        [
            ("Response length", ["response_length/mean", "response_length/max"], None),
            ("Responses hitting the length limit", ["response_length/clip_ratio"], None),
        ],
    ),
    ("Entropy", [("Policy entropy", ["actor/entropy"], None)]),
    (
        "Weighting hook",
        [
            (
                "Token weight (global over the step)",
                ["actor/reweight/weight_mean", "actor/reweight/weight_min", "actor/reweight/weight_max"],
                None,
            ),
            ("Fraction of tokens with weight > 1.05", ["actor/reweight/frac_weight_above_1.05"], None),
            ("Weight applied in the loss (mean per micro-batch)", ["actor/reweight/loss_weight_mean"], None),
            ("PPL: mean |z| of log-perplexity in the group", ["actor/reweight/ppl_abs_z_mean"], None),
        ],
    ),
    (
        "Top-p rollout mismatch",
        [
            (
                "Mass cut by the rollout's nucleus",
                ["rollout/top_p_truncated_mass_net_mean", "rollout/top_p_mismatch_floor",
                 "rollout/top_p_truncated_mass_mean", "rollout/top_p_frac_tokens_truncated_over_1pct"],
                None,
            ),
            ("Rollout vs trainer probabilities", ["training/rollout_probs_diff_mean", "training/rollout_probs_diff_max"], None),
            ("verl rollout correction", [], r"rollout_corr/.*"),
        ],
    ),
    (
        "Optimisation",
        [
            ("Gradient norm", ["actor/grad_norm"], None),
            ("PPO clipping", ["actor/pg_clipfrac", "actor/pg_clipfrac_lower"], None),
            ("PPO KL to the rollout policy", ["actor/ppo_kl"], None),
        ],
    ),
]


def dashboard_metric_keys() -> list[str]:
    """Every exact metric key the dashboard plots (regex panels excluded)."""
    return [key for _, panels in DASHBOARD_SECTIONS for _, keys, _ in panels for key in keys]


def build_workspace(entity: str, project: str, name: str = "DAPO reweight (paper figures)"):
    """A `wandb_workspaces.workspaces.Workspace` with the sections above (nothing sent)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = []
    for section, panels in DASHBOARD_SECTIONS:
        plots = [
            wr.LinePlot(title=title, x="Step", y=list(keys), metric_regex=regex, groupby_aggfunc="mean")
            for title, keys, regex in panels
        ]
        sections.append(ws.Section(name=section, panels=plots, is_open=True))
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"),
                    help="wandb entity (user or team); default $WANDB_ENTITY; not needed with --print")
    ap.add_argument("--project", default="dapo_reweight", help="wandb project (trainer.project_name)")
    ap.add_argument("--name", default="DAPO reweight (paper figures)", help="name of the saved view")
    ap.add_argument("--print", action="store_true", help="print the layout instead of saving it to wandb")
    args = ap.parse_args(argv)
    with exit_on_config_error("dashboard"):
        if not args.print and not args.entity:
            raise ConfigError("--entity is not set; valid: a wandb user or team (or set WANDB_ENTITY), "
                              "or --print to list the layout offline")
    workspace = build_workspace(args.entity or "ENTITY", args.project, args.name)
    if args.print:
        for section in workspace.sections:
            print(f"## {section.name}")
            for panel in section.panels:
                print(f"  - {panel.title}: {', '.join(panel.y) or panel.metric_regex}")
        return
    workspace.save()
    print(f"saved wandb view {args.name!r}: {workspace.url}")


if __name__ == "__main__":
    main()
