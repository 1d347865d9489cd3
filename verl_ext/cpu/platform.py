"""verl platform `cpu`: run verl's trainer on a machine without any accelerator.

Selected only explicitly, with the environment variable `VERL_PLATFORM=cpu` (set it in the
driver and pass it to Ray workers through `ray_kwargs.ray_init.runtime_env.env_vars`); verl's
auto-detection never picks it, so GPU machines are unaffected.

What the platform provides (verl asks the platform, never torch.cuda, for these):
- device `cpu`, collective backend `gloo`, `current_device()` = `torch.device("cpu")`;
- Ray resource name `GPU`: start Ray with a fake GPU resource (`ray_init.num_gpus=1`) so that
  verl's GPU resource pools place their workers;
- a device module (`torch.cpu` plus no-op memory/stream helpers that verl calls on
  `torch.cuda`);
- `torch.distributed.init_process_group` accepting verl's backend string
  `cpu:gloo,<device>:<backend>`, which for device `cpu` names the same device twice and which
  torch rejects: the platform, when created as the selected platform, wraps the function once
  to drop the duplicate entry (nothing else changes).
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from typing import Any

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"
ENV_VAR = "VERL_PLATFORM"


def cpu_platform_selected() -> bool:
    """True when this process asked verl for the cpu platform (`VERL_PLATFORM=cpu`)."""
    return os.environ.get(ENV_VAR, "").strip().lower() == PLATFORM_NAME


def dedupe_backend(backend: str | None) -> str | None:
    """Drop repeated devices from a `device:backend,...` string: "cpu:gloo,cpu:gloo" -> "cpu:gloo".

    The first entry for each device wins; a plain backend name ("gloo") is returned unchanged.
    """
    if not backend or ":" not in backend:
        return backend
    seen, kept = set(), []
    for entry in backend.split(","):
        device = entry.split(":", 1)[0].strip()
        if device not in seen:
            seen.add(device)
            kept.append(entry.strip())
    return ",".join(kept)


def install_init_process_group_fix() -> None:
    """Wrap `torch.distributed.init_process_group` (once) so its backend is de-duplicated."""
    import torch.distributed as dist

    original = dist.init_process_group
    if getattr(original, "_verl_ext_dedupe_backend", False):
        return

    @functools.wraps(original)
    def init_process_group(*args, **kwargs):
        if "backend" in kwargs:
            kwargs["backend"] = dedupe_backend(kwargs["backend"])
        elif args:
            args = (dedupe_backend(args[0]), *args[1:])
        return original(*args, **kwargs)

    init_process_group._verl_ext_dedupe_backend = True
    dist.init_process_group = init_process_group


def _host_memory() -> tuple[int, int]:
    """(free, total) bytes of host memory, the cpu analogue of `torch.cuda.mem_get_info`."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total


class _CPUDeviceModule(types.ModuleType):
    """`torch.cpu` plus no-op versions of the `torch.cuda` calls verl makes on its device module."""

    def __init__(self):
        super().__init__("verl_ext.cpu.device_module")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    # memory bookkeeping: nothing is cached on the host side
    def empty_cache(self) -> None: ...
    def ipc_collect(self) -> None: ...
    def reset_peak_memory_stats(self, device=None) -> None: ...
    def reset_accumulated_memory_stats(self, device=None) -> None: ...
    def set_per_process_memory_fraction(self, fraction, device=None) -> None: ...
    def memory_allocated(self, device=None) -> int:
        return 0

    def memory_reserved(self, device=None) -> int:
        return 0

    def max_memory_allocated(self, device=None) -> int:
        return 0

    def max_memory_reserved(self, device=None) -> int:
        return 0

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return _host_memory()

    def get_device_properties(self, device=None):
        return types.SimpleNamespace(name="cpu", total_memory=_host_memory()[1])

    def get_device_name(self, device=None) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, device=None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device=None) -> None:
        torch.set_rng_state(state)


CPU_DEVICE_MODULE = _CPUDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for hosts without accelerators (gloo collectives, fake Ray `GPU` resource)."""

    def __init__(self):
        if cpu_platform_selected():
            install_init_process_group_fix()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Never auto-detected: a GPU cluster's CPU-only processes must keep verl's default.
        return False

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for actors holding the fake `GPU` resource; nothing reads it on cpu.
        return "CUDA_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def cudart(self) -> Any:
        return None
