"""Build the Cython extensions of `_core` (and the benchmark load generator).

Set SWITCHBOARD_DEBUG=1 for a debug build: annotated HTML, line tracing,
`-O0 -g`, and the SWITCHBOARD_DEBUG C macro that turns on invariant checks
(they compile to nothing in a release build).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SWITCHBOARD_DEBUG", "") not in ("", "0")

MODULES = ["_codec", "_producers", "_shards", "_routing", "_log", "_ws"]

macros = [("SWITCHBOARD_DEBUG", "1" if DEBUG else "0")]
if DEBUG:
    macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    cflags = ["-O0", "-g3", "-UNDEBUG"]
else:
    cflags = ["-O2"]

extensions = [
    Extension(
        f"_core.{name}",
        [f"_core/{name}.pyx"],
        include_dirs=["_core/includes"],
        define_macros=macros,
        extra_compile_args=cflags,
    )
    for name in MODULES
] + [
    # the benchmark's load generator: a client fast enough not to be what is measured
    Extension("bench._loadgen", ["bench/_loadgen.pyx"], include_dirs=["_core/includes"],
              define_macros=macros, extra_compile_args=cflags),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "linetrace": DEBUG,
            "profile": False,
            "embedsignature": True,
        },
    ),
)
