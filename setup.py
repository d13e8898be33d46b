"""Only the C part of the build; everything else is in pyproject.toml.

The relay's fast lane (src/catflap/gateway/_fastlane.c) is optional: where it cannot be built
(no C compiler, not Linux), catflap relays on the event loop instead.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "catflap.gateway._fastlane",
            ["src/catflap/gateway/_fastlane.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
