"""Nox sessions: tests, lint, demo, bench (and, with the template, its variants).

Sessions run in the environment nox itself runs in (``make`` bootstraps ``.venv`` with
everything installed), so no session downloads jax again.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "none"

EIGHT_CPU_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@nox.session
def tests(session: nox.Session) -> None:
    """Runs the plugins test suite on 8 simulated CPU devices."""
    workers = os.environ.get("PYTEST_WORKERS", "2")
    session.run("pytest", "-q", "-n", workers, *session.posargs, env=EIGHT_CPU_DEVICES)


@nox.session
def lint(session: nox.Session) -> None:
    """Lints with ruff."""
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """Shows what plugins builds from an example config: parameter table and LR curve."""
    session.run("python", "-m", "plugins.demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Runs the benchmarks and prints side-by-side ratios."""
    session.run("python", "-m", "benchmarks.run", *session.posargs)
