"""`python -m verl_ext.evaluation [overrides]` (config: `evaluate.yaml` of `verl_ext.core.paths.config_dir()`)."""

from verl_ext.evaluation.command import main

if __name__ == "__main__":
    main()
