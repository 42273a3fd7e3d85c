"""Build hook: compiles the cffi extension qubes_gpu_share._native.

Everything else (metadata, dependencies, packages) lives in pyproject.toml;
setuptools runs this file for ``pip install``, ``pip install -e`` and
``pip wheel`` alike, so the compiled module is in all three.
"""

from setuptools import setup

setup(cffi_modules=["qubes_gpu_share/_native_build.py:ffibuilder"])
