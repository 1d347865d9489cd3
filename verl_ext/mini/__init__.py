"""The paper in miniature on one CPU (`scripts/reproduce_mini.sh`).

base model by SFT -> verl DAPO with each weighting -> Avg@k / Pass@k -> Δlog p analysis ->
token-replacement and extrapolation sweeps -> `report.md` with a verdict per claim of the paper.
Every stage reuses the project's own commands (`run_baselines.sh`, `verl_ext.evaluation`,
`verl_ext.analysis`, `verl_ext.decoding.sweep`); this package only chains them and reports.
"""


def run_name(scheme: str, seed: int) -> str:
    """A trained model's name: the weighting and the training seed (the pipeline and the report)."""
    return f"{scheme}-seed{seed}"
