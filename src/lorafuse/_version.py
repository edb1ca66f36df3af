"""lorafuse's version, from one place: pyproject.toml's `version`, which scikit-build-core passes to the build
as SKBUILD_PROJECT_VERSION and the build compiles into the core (`_core.__version__`, read through
backends.native). The installed distribution's metadata says the same (tests/test_isa.py checks both);
reading it through importlib.metadata would cost every command ~20 ms of start-up."""

from __future__ import annotations


def get_version() -> str:
    from lorafuse.backends import native

    return native.VERSION


__all__ = ["get_version"]
