"""The C scan of the projected inverted file (engine/_ivfscan.c); everything else is in pyproject.toml.

Optional: where no C compiler is found the build goes on without it, and the engine searches with
numpy and faiss instead (the same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("engine._ivfscan", ["engine/_ivfscan.c"], optional=True,
                             extra_compile_args=["-O3", "-fno-math-errno"])])
