"""Install the directional-RLVR recipe extension next to a pip-installed verl 0.9.1.

CPU machines: install `torch==2.13.0` first (scripts/install.sh does), otherwise pip pulls a
CUDA build of torch. GPU clusters: `pip install -e .[gpu]` brings vLLM and flash-attn in the
versions verl 0.9.1 was released against.
"""

from setuptools import find_packages, setup

setup(
    name="verl-directional-rlvr",
    version="0.1.0",
    description=(
        "verl recipe extension for 'On the Direction of RLVR Updates for LLM Reasoning' "
        "(Huang et al. 2026): low-probability advantage reweighting, Δlog p analysis, "
        "selective token replacement / extrapolation, Avg@k / Pass@k evaluation."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["verl_ext", "verl_ext.*", "recipe", "recipe.*"]),
    package_data={"recipe": ["**/*.yaml"]},
    install_requires=[
        "verl[verl-core]==0.9.1",  # verl-core: TransferQueue, fastapi, cachetools... (no torch pin)
        "torch>=2.6",
        "TransferQueue>=0.1.10",
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
        # Versions from verl 0.9.1's own `vllm` and `flash-attn-cu130torch211` extras.
        "gpu": ["vllm==0.24.0", "flash-attn==2.8.3"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff"],
    },
    entry_points={
        # verl loads this group on `import verl` in every process, Ray workers included.
        "verl.plugins": ["dapo_reweight = verl_ext.verl_plugin"],
    },
)
