# Shim for tools that still call setup.py directly; configuration lives in pyproject.toml.
from setuptools import setup

setup()
