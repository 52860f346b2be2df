"""Packaging: the top-level ``kernels/`` folder is installed as ``rlhf_fast.kernels``.

Metadata, dependencies and extras live in pyproject.toml; this file only maps the folders.
"""

from setuptools import setup

setup(
    packages=[
        "rlhf_fast",
        "rlhf_fast.bench",
        "rlhf_fast.ops",
        "rlhf_fast.reference",
        "rlhf_fast.torch_backend",
        "rlhf_fast.kernels",
    ],
    package_dir={"rlhf_fast": "rlhf_fast", "rlhf_fast.kernels": "kernels"},
)
