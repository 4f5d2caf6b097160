"""Build hooks of the flowsteer package (the metadata is in pyproject.toml).

- ``build_py`` also compiles ``flowsteer/bpf/*.bpf.c`` with clang (scripts/build_bpf.py): into the
  build tree for a wheel, in place for an editable install. So a wheel carries the BPF objects and
  installs on machines without clang; the sdist carries only the sources.
- ``build_ext`` compiles ``flowsteer/divert/_nfqueue.c``, the divert socket's per-packet receive and
  accept, against CPython's stable ABI (3.11 and later).
- the wheel is tagged ``cp311-abi3-linux_<machine>``: any CPython from 3.11 on, this machine's platform
  (the extension is machine code, the BPF objects are compiled for the build machine's byte order).
"""

from __future__ import annotations

import importlib.util
import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.errors import ExecError

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("build_bpf", os.path.join(HERE, "scripts", "build_bpf.py"))
assert _spec is not None and _spec.loader is not None
build_bpf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_bpf)


class BuildPyWithBpf(build_py):
    """build_py that also compiles the BPF objects (and lists them among its outputs)."""

    def _objects(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """Returns (source, object, defines) triples; objects go to the build tree, or next to the
        sources when the install is editable."""
        target = HERE if self.editable_mode else self.build_lib
        return build_bpf.objects(os.path.join(HERE, "flowsteer", "bpf"), os.path.join(target, "flowsteer", "bpf"))

    def run(self) -> None:
        super().run()
        for source, output, defines in self._objects():
            os.makedirs(os.path.dirname(output), exist_ok=True)
            try:
                build_bpf.compile_object(source, output, defines)
            except build_bpf.BuildError as exc:
                raise ExecError(str(exc)) from None

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, *(obj for _, obj, _ in self._objects())]


# -Wall without -Werror: a user's newer compiler may warn about what this one does not
NFQUEUE_EXTENSION = Extension("flowsteer.divert._nfqueue", ["flowsteer/divert/_nfqueue.c"], py_limited_api=True,
                              extra_compile_args=["-Wall", "-Werror=implicit-function-declaration"])

setup(cmdclass={"build_py": BuildPyWithBpf}, ext_modules=[NFQUEUE_EXTENSION],
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
