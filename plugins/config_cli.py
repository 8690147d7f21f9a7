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

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Sequence

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


# ml_collections' message for a value of the wrong type set on a (type-safe) ConfigDict field.
_WRONG_TYPE = re.compile(
    r"Could not override field '(?P<field>[^']+)' \(reference\)\. (?P<value>.*) is of original "
    r"type <class '(?P<given>[\w.]+)'> and cannot be casted to type <class '(?P<expected>[\w.]+)'>"
)


def config_file_error_line(text: str, argv: Sequence[str]) -> str | None:
    """The one line for ml_collections' ``Error whilst parsing config file: <traceback>`` (a
    ``TypeError``/``ValueError`` raised inside ``get_config()``), or None for other errors.

    A value of the wrong type becomes ``config error: cannot load --config=F: optimizer.
    learning_rate (line 4): given 'fast' (a str), expected a float``; anything else the
    exception's last line and the config file's line that raised it.
    """
    if "Error whilst parsing config file:" not in text:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    path = config_path(argv).split(":", 1)[0]
    lineno, source = None, ""
    for i, line in enumerate(lines):
        frame = re.match(r'\s*File "(.+)", line (\d+)', line)
        if frame and path and os.path.abspath(frame.group(1)) == os.path.abspath(path):
            lineno = int(frame.group(2))
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            source = "" if following.startswith("File ") else following
    at = f" (line {lineno})" if lineno else ""
    last = " ".join(lines[-1].split()) if lines else text
    wrong = _WRONG_TYPE.search(last)
    if not wrong:
        return cannot_load_line(argv, f"{last}{at}")
    key = wrong["field"]
    # `config.optimizer.learning_rate = 'fast'` names the whole path of the key.
    assigned = re.match(r"[A-Za-z_]\w*((?:\.[A-Za-z_]\w*)+)\s*=(?!=)", source)
    if assigned and assigned.group(1).rsplit(".", 1)[-1] == key:
        key = assigned.group(1)[1:]
    given, expected = _a(wrong["given"]), _a(wrong["expected"])
    # ml_collections writes the value with str(): quote it back when it was a string.
    value = repr(wrong["value"]) if wrong["given"] == "str" else wrong["value"]
    return cannot_load_line(argv, f"{key}{at}: given {value} ({given}), expected {expected}")


def _a(type_name: str) -> str:
    """``'a float'``, ``'an int'``."""
    return f"{'an' if type_name[:1] in 'aeiou' else 'a'} {type_name}"


@contextlib.contextmanager
def config_imports(argv: Sequence[str]) -> Iterator[None]:
    """While loading the ``--config`` file of ``argv``: the parent of its folder on
    ``sys.path``, so that ``configs/quick.py`` can ``from configs import default`` as it does
    under the project's ``main.py`` (whose folder, the project root, Python puts there)."""
    path = config_path(argv).split(":", 1)[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(path))) if path else ""
    added = bool(root) and root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        yield
    finally:
        if added and root in sys.path:
            sys.path.remove(root)


def parse_error_line(error: BaseException, argv: Sequence[str]) -> str:
    """The one line for an error in ``PARSE_ERRORS`` raised while parsing ``argv``."""
    if isinstance(error, flags.Error):  # e.g. --config.num_train_steps=abc
        in_file = config_file_error_line(str(error), argv)
        return in_file or f"flag error: {' '.join(str(error).split())}"
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
