"""One-line errors for command lines that load an ml_collections config file.

absl parses ``--config=FILE --config.key=value`` (``config_flags.DEFINE_config_file``) and raises
what it met on the way: ``flags.Error`` for a value of the wrong type, ``SyntaxError`` from the
file, ``AttributeError``/``KeyError`` for an override of a key the (locked) config lacks, and an
``OSError`` on first use of a file that could not be read. These functions turn each into the
one line a user needs; the generated project's ``main.py`` and ``plugins-lr-curve`` share them.
``workdir_problem`` checks a ``--workdir`` up front, before anything is loaded or compiled.

    try:
        FLAGS(argv)
    except PARSE_ERRORS as error:
        sys.exit(config_cli.parse_error_line(error, argv))
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from absl import flags

# What parsing such flags raises for a user's mistake.
PARSE_ERRORS = (flags.Error, SyntaxError, AttributeError, KeyError)


def innermost_message(error: BaseException) -> str:
    """The text of ``error``, or of the exception it wraps (config_flags wraps KeyErrors),
    on one line."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return " ".join(str(error.args[0] if error.args else error).split())


def config_path(argv: Sequence[str]) -> str:
    """The ``--config`` file named in ``argv`` (``--config=F`` or ``--config F``), or ``''``."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    given += [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    return given[0] if given else ""


def cannot_load_line(argv: Sequence[str], why: str) -> str:
    """``config error: cannot load --config=FILE: why``."""
    return f"config error: cannot load --config={config_path(argv)}: {why}"


def unknown_key_line(error: BaseException, argv: Sequence[str]) -> str:
    """``config error: unknown key ...`` for an override of a key the locked config lacks,
    naming the override's full path as typed (ml_collections names only its last part)."""
    text = innermost_message(error)
    match = re.match(r"^'([^']+)'\s*(.*)$", text)
    if not match:
        return f"config error: {text}"
    key, rest = match.groups()
    overrides = [a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")]
    path = next((o for o in overrides if o.split(".")[-1] == key or f".{key}." in f".{o}."), key)
    line = f"config error: unknown key {path!r}" + (f". {rest}" if rest else "")
    if ".kwargs." in f".{path}":
        line += (
            " (the config is locked: optimizer kwargs the config file does not set can only be"
            " added in a config file, e.g. kwargs=dict(b2=0.95))"
        )
    return line


def parse_error_line(error: BaseException, argv: Sequence[str]) -> str:
    """The one line for an error in ``PARSE_ERRORS`` raised while parsing ``argv``."""
    if isinstance(error, flags.Error):  # e.g. --config.num_train_steps=abc
        return f"flag error: {' '.join(str(error).split())}"
    if isinstance(error, SyntaxError):  # in the config file
        return cannot_load_line(argv, f"{error.msg} (line {error.lineno})")
    if "get_config" in str(error):
        return cannot_load_line(argv, "it defines no get_config()")
    return unknown_key_line(error, argv)  # e.g. --config.num_train_step=5


def load_error_line(error: OSError, argv: Sequence[str]) -> str:
    """The one line for the ``OSError`` a config file that could not be read raises on first
    use (``config.keys()``), e.g. ``config error: cannot load --config=x.py: No such file or
    directory``."""
    text = innermost_message(error)
    found = re.search(r"\[Errno \d+\] ([^:]+)", text)
    return cannot_load_line(argv, found.group(1) if found else text)


def workdir_problem(workdir: str) -> str | None:
    """Why a run could not write to ``workdir`` (a file, not writable, under a file), or None.

    Creates nothing: a directory that does not exist yet is fine when its nearest existing
    parent is a directory this process can write to.
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{workdir} is a file, not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{workdir} is not writable (checkpoints and TensorBoard events go there)"
        return None
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{workdir} cannot be created: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{workdir} cannot be created: {parent} is not writable"
    return None
