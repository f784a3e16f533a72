"""The engine's C kernels (engine/_ivfscan.c: the projected inverted file's scans, the
projection, the anomaly map's banded product); everything else is in pyproject.toml.

Optional: where no C compiler is found the build goes on without it, and the engine searches with
faiss and numpy instead (the same results, slower). The scans' vectors are GCC / clang extensions:
built by MSVC they have no vector code, and the engine leaves them unused
(``engine.ivfscan.AVAILABLE``).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class _BuildExt(build_ext):
    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":       # GCC or clang
            for extension in self.extensions:
                extension.extra_compile_args = ["-O3", "-fno-math-errno", "-Wno-psabi"]
        super().build_extensions()


setup(ext_modules=[Extension("engine._ivfscan", ["engine/_ivfscan.c"], optional=True)],
      cmdclass={"build_ext": _BuildExt})
