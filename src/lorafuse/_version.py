"""lorafuse's version, from one place: pyproject.toml's `version`, as the installed distribution
records it, or, in a source tree on sys.path without an install, as the build put it into the
compiled core (SKBUILD_PROJECT_VERSION -> `_core.__version__`, read through backends.native)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version


@cache
def get_version() -> str:
    try:
        return version("lorafuse")
    except PackageNotFoundError:
        from lorafuse.backends import native

        return str(native.VERSION)


__all__ = ["get_version"]
