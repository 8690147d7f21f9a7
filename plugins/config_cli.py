"""One-line errors for command lines that load an ml_collections config file.

absl parses ``--config=FILE --config.key=value`` (``config_flags.DEFINE_config_file``) and raises
what it met on the way: ``flags.Error`` for a value of the wrong type, ``SyntaxError`` from the
file, ``AttributeError``/``KeyError`` for an override of a key the (locked) config lacks, and an
``OSError`` on first use of a file that could not be read. These functions turn each into the
one line a user needs; the generated project's ``main.py`` and ``plugins-lr-curve`` share them.
``workdir_problem`` checks a ``--workdir`` up front, before anything is loaded or compiled;
``workdir_path`` is what every part of a run makes of it (URLs kept, ``~`` expanded) and
``workdir_lock`` keeps a second run out of a workdir being trained in.

    try:
        FLAGS(argv)
    except PARSE_ERRORS as error:
        sys.exit(config_cli.parse_error_line(error, argv))
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import sys
import traceback
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from absl import flags, logging

try:
    import fcntl
except ImportError:  # Windows: no workdir lock
    fcntl = None

if TYPE_CHECKING:
    from etils import epath

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


def raised_in_config_file(error: BaseException, argv: Sequence[str]) -> int | None:
    """The line of the ``--config`` file of ``argv`` that ``error`` went through last (the
    file's own code raised it, or code it called or imported), or None."""
    path = config_path(argv).split(":", 1)[0]
    if not path:
        return None
    where = os.path.abspath(path)
    frames = traceback.extract_tb(error.__traceback__)
    lines = [f.lineno for f in frames if f.filename and os.path.abspath(f.filename) == where]
    return lines[-1] if lines else None


def config_code_error_line(error: BaseException, argv: Sequence[str]) -> str:
    """The one line for an exception the config file's own code raised while it was loaded
    (``get_config()`` raising, recursing, importing a missing module, ...): ``config error:
    cannot load --config=F: RuntimeError: boom (line 2)``."""
    lineno = raised_in_config_file(error, argv)
    at = f" (line {lineno})" if lineno else ""
    text = " ".join(str(error).split())[:300]
    return cannot_load_line(argv, f"{type(error).__name__}: {text}{at}" if text else
                            f"{type(error).__name__}{at}")  # fmt: skip


@contextlib.contextmanager
def no_bools_as_numbers() -> Iterator[None]:
    """While loading a config file: ``True``/``False`` assigned to a float field (ml_collections
    casts ``int`` to ``float``, and a bool is an int) raises ml_collections' own wrong-type
    ``TypeError`` instead of becoming ``1.0``/``0.0`` (``learning_rate = True``)."""
    from ml_collections.config_dict import config_dict

    original = config_dict._safe_cast

    def safe_cast(value, field_type, type_safe=False):  # noqa: ANN001, ANN202 -- as ml_collections'
        if isinstance(value, bool) and field_type is float:
            raise TypeError(
                f"{value} is of original type {type(value)} and cannot be casted to type "
                f"{field_type}"
            )
        return original(value, field_type, type_safe)

    config_dict._safe_cast = safe_cast
    try:
        yield
    finally:
        config_dict._safe_cast = original


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
        if not in_file and config_path(argv) and "--config must have a value" in str(error):
            # absl's words for a config file whose get_config() returned None
            in_file = cannot_load_line(argv, "get_config() returned None, not a ConfigDict")
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


# A URL's scheme (``gs://``, ``s3://``, ``file://``): such workdirs go to orbax and TensorBoard as
# they are written.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
EMPTY_WORKDIR = (
    "--workdir is empty: name a directory for checkpoints and TensorBoard events, "
    "e.g. --workdir=runs/first"
)


def is_remote(workdir: str) -> bool:
    """Whether ``workdir`` is a URL other than ``file://`` (``gs://bucket/run``, ...)."""
    return bool(_URL.match(workdir)) and not workdir.startswith("file://")


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as every part of a run uses it (orbax, TensorBoard, the lock, the config and
    plot files): an ``etils.epath.Path``.

    A remote URL (``gs://bucket/run``) is passed through untouched; a ``file://`` URL is its local
    path; a local path has ``~`` expanded and is made absolute (``~/x`` means ``$HOME/x``
    everywhere). An empty workdir raises ``ValueError`` (it would mean the current folder).
    """
    from etils import epath

    if isinstance(workdir, epath.Path):
        workdir = os.fspath(workdir)
    workdir = os.fspath(workdir)
    if not workdir.strip():
        raise ValueError(EMPTY_WORKDIR)
    if is_remote(workdir):
        return epath.Path(workdir)
    if workdir.startswith("file://"):
        parsed = urllib.parse.urlparse(workdir)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{workdir}: a file:// URL names a local path (file:///path)")
        workdir = urllib.parse.unquote(parsed.path)
    return epath.Path(os.path.abspath(os.path.expanduser(workdir)))


def workdir_problem(workdir: str) -> str | None:
    """Why a run could not write to ``workdir`` (empty, a file, not writable, under a file), or
    None.

    Creates nothing: a directory that does not exist yet is fine when its nearest existing
    parent is a directory this process can write to. A remote URL (``gs://...``) is not checked
    here (that needs the network): orbax and TensorBoard report what they meet.
    """
    try:
        resolved = workdir_path(workdir)
    except ValueError as error:
        return str(error)
    if is_remote(workdir):
        return None
    path = os.fspath(resolved)
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


# ----------------------------------------------------------------------------- the workdir lock

LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
    """Another run (a live process) holds the workdir's lock."""


def lock_file(workdir: epath.Path, process_index: int = 0) -> epath.Path:
    """The lock file of ``process_index`` in ``workdir``: ``.lock`` (process 0), ``.lock.<i>``."""
    return workdir / (LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}")


def _holder(path: str) -> str:
    """``process PID on HOST since TIME`` as the holder wrote it in its lock file."""
    try:
        with open(path, encoding="utf-8") as file:
            info = json.load(file)
        return f"process {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment after it was taken
        return "another process"


def _busy_line(workdir: epath.Path, path: str) -> str:
    return (
        f"{workdir} is in use by {_holder(path)} (it holds {path}); wait for that run to end, "
        "or use another --workdir"
    )


# Lock files this process holds: {path: [file descriptor, how many holders]}.
_HELD: dict[str, list[int]] = {}


def workdir_in_use(workdir: str | os.PathLike, process_index: int = 0) -> str | None:
    """Why ``workdir`` cannot be trained in now (another live process holds its lock), or None.

    Writes nothing: it only tries the lock file, if there is one, and lets it go.
    """
    try:
        resolved = workdir_path(workdir)
    except ValueError:
        return None
    if is_remote(os.fspath(workdir)):
        return None
    path = os.fspath(lock_file(resolved, process_index))
    if fcntl is None or path in _HELD or not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _busy_line(resolved, path)
    except OSError:  # a file system without locks: the lock taken by the run says so
        return None
    finally:
        os.close(fd)  # releases the lock, if taken
    return None


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, process_index: int = 0) -> Iterator[None]:
    """Holds ``workdir``'s lock while training in it; raises :class:`WorkdirBusy` at once when a
    live process holds it.

    The lock is ``fcntl.flock`` on ``<workdir>/.lock`` (``.lock.<i>`` for process ``i`` of a
    multi-process run: each process locks its own, so a second multi-process run into the same
    shared workdir is refused on every process). The operating system drops it when its process
    ends, however it ends (SIGKILL included), so a killed run never leaves the workdir stuck;
    the file stays, naming the last holder. Re-entrant within one process.

    Limits: a remote workdir (``gs://...``) is not locked (object stores have no locks); on a
    network file system the lock holds across machines only where the file system implements
    ``flock`` for its clients (NFSv4 and Lustre do; NFSv3 without ``lockd``, some FUSE and SMB
    mounts lock per machine only, or not at all: then a warning says so and training goes on).
    """
    resolved = workdir_path(workdir)
    if is_remote(os.fspath(workdir)):
        logging.info("%s is remote: not locked (only local and network file systems are)", workdir)
        yield
        return
    path = os.fspath(lock_file(resolved, process_index))
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    resolved.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is None:
            raise OSError("no fcntl on this system")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirBusy(_busy_line(resolved, path)) from None
    except OSError as error:  # e.g. ENOLCK: a file system without locks
        logging.warning("%s cannot be locked (%s): nothing stops a second run into it", path, error)
        os.close(fd)
        fd = None
    if fd is None:
        yield
        return
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), since=since))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (info + "\n").encode(), 0)
    _HELD[path] = [fd, 1]
    try:
        yield
    finally:
        _HELD[path][1] -= 1
        if not _HELD[path][1]:
            del _HELD[path]
            os.close(fd)  # releases the lock
