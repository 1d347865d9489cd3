"""verl plugin: registers this project's extensions in verl's registries.

verl imports this module on `import verl` in every process (entry point group
`verl.plugins`, declared in setup.py), so the registrations exist inside Ray workers too.
Set `VERL_USE_EXTERNAL_MODULES=verl_ext.verl_plugin` where entry points are not available
(e.g. running from a source tree that is not pip-installed).
"""

from verl_ext import (
    cpu,  # noqa: F401
    policy_loss,  # noqa: F401  (policy loss `dapo_reweight`)
    trainer,  # noqa: F401  (v1 trainer mode `dapo_reweight`)
)
