"""Run verl's trainer without a GPU: a `cpu` platform and the `hf_reproducible` rollout backend.

Importing this package registers both with verl (it is imported by `verl_ext.verl_plugin`,
which verl loads in every process). Registration only adds names to verl's registries; nothing
changes until a run selects them:

- platform `cpu`: environment variable `VERL_PLATFORM=cpu` (never auto-detected);
- rollout `hf_reproducible` (bit-identical reruns, `verl_ext.cpu.rollout`):
  `actor_rollout_ref.rollout.name=hf_reproducible actor_rollout_ref.rollout.full_determinism=true`.
  CPU runs otherwise use verl's own `vllm` rollout on vLLM's CPU build (`verl_ext.vllm_cpu`).

The heavy modules (transformers generation, the Ray server) load only when `hf_reproducible` is
used. `configs/preset/tiny-cpu.yaml` holds every override a CPU run needs.
"""

import os
import sys

PLATFORM_MODULE = "verl_ext.cpu.platform"


def _import_verl_with_platform_first() -> None:
    """Import verl so that platform `cpu` is registered before verl loads its plugins.

    When this package is imported before verl (a Ray worker unpickling the hf server, a script),
    `import verl` runs verl's plugins, and with VERL_PLATFORM=cpu any plugin module that asks for
    the platform at import time would fail while `cpu` is not registered yet. verl imports the
    modules named in VERL_USE_EXTERNAL_MODULES before its plugins: name the platform module there
    for the duration of this import only.
    """
    if "verl" in sys.modules:
        return
    key = "VERL_USE_EXTERNAL_MODULES"
    previous = os.environ.get(key)
    os.environ[key] = ",".join(m for m in (PLATFORM_MODULE, previous) if m)
    try:
        import verl  # noqa: F401
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


_import_verl_with_platform_first()

from verl.workers.rollout import base as _rollout_base
from verl.workers.rollout.replica import RolloutReplicaRegistry

from verl_ext.cpu import platform as platform
from verl_ext.cpu.platform import PLATFORM_NAME, cpu_platform_selected  # noqa: F401

ROLLOUT_NAME = "hf_reproducible"
ADAPTER_FQN = "verl_ext.cpu.rollout.HFServerAdapter"


def _load_hf_replica():
    from verl_ext.cpu.rollout import HFReplica

    return HFReplica


def register_rollout() -> None:
    """Register the `hf_reproducible` replica (driver side) and its worker adapter (verl's rollout table)."""
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)
    _rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ADAPTER_FQN


register_rollout()
