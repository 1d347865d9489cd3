"""Evaluation: Avg@k and unbiased Pass@k with Math-Verify grading (`python -m verl_ext.evaluation`).

- `metrics`: `pass_at_k`, `avg_at_k` and their means over problems.
- `report`: grading records, per-problem results, the per-dataset table (markdown / JSON), wandb.
- `command`: the hydra command (configs/evaluate.yaml, scripts/evaluate.sh): grade an existing
  file of generations, or generate with a model and then grade.
"""

from verl_ext.evaluation.metrics import avg_at_k, mean_avg_at_k, mean_pass_at_k, pass_at_k

__all__ = ["avg_at_k", "mean_avg_at_k", "mean_pass_at_k", "pass_at_k"]
