"""`python -m verl_ext.evaluation --config-path <repo>/configs --config-name evaluate [overrides]`."""

from verl_ext.evaluation.command import main

if __name__ == "__main__":
    main()
