# Metadata lives in pyproject.toml; this shim only lets tools that still call setup.py work.
from setuptools import setup

setup()
