"""Compatibility shim: the package metadata lives in ``pyproject.toml`` (PEP 621).

Kept so that tools and habits calling ``setup.py`` directly still work.
"""

from setuptools import setup

setup()
