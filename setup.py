"""Packaging: the top-level ``kernels/`` folder is installed as ``rlhf_fast.kernels``.

Metadata, dependencies and extras live in pyproject.toml; this file only maps the folders.
Every package under ``rlhf_fast/`` is found automatically; data files shipped inside the
package (task data, tokenizer vocabularies, knowledge bases) are listed in ``PACKAGE_DATA``.
"""

from setuptools import find_packages, setup

PACKAGE_DATA = ["*.json", "*.jsonl", "*.txt"]

setup(
    packages=[*find_packages(include=["rlhf_fast", "rlhf_fast.*"]), "rlhf_fast.kernels"],
    package_dir={"rlhf_fast": "rlhf_fast", "rlhf_fast.kernels": "kernels"},
    package_data={"": PACKAGE_DATA},
)
