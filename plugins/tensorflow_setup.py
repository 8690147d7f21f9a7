"""TensorFlow as a JAX trainer uses it: reading tfds data, writing TensorBoard events, no GPUs.

Importing TensorFlow and clu's metric writers takes seconds (TensorFlow, then Keras through
TensorBoard's hparams plugin). None of it is needed to build a model or compile its steps, so a
trainer can import it in a background thread meanwhile:

    tensorflow_setup.start_import(["clu.metric_writers"])   # returns at once
    ...                                                     # build the model, compile the steps
    tensorflow_setup.wait()                                 # before reading data or writing events

The thread imports TensorFlow, hides the GPUs and TPUs from it (JAX owns them; TensorFlow would
otherwise reserve their memory when it first runs an op) and then imports ``modules``. ``wait()``
re-raises whatever the thread raised; called without ``start_import`` it does the same work
itself. Start the thread after the main thread's own imports (jax, flax, ...): two threads
importing the same modules at once is what Python's import locks handle least gracefully.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Sequence

_lock = threading.Lock()
_thread: threading.Thread | None = None
_error: BaseException | None = None


@functools.cache
def hide_accelerators() -> None:
    """Imports TensorFlow and hides the GPUs/TPUs from it (they belong to JAX)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # Devices already initialised, or no such device type.
        pass


def _prepare(modules: Sequence[str]) -> None:
    global _error
    try:
        hide_accelerators()
        for name in modules:
            importlib.import_module(name)
    except BaseException as error:  # noqa: BLE001 -- re-raised by wait() in the caller's thread
        _error = error


def start_import(modules: Sequence[str] = ()) -> None:
    """Starts importing TensorFlow (GPUs hidden) and then ``modules`` in a background thread.

    Returns at once. A second call while or after the first ran does nothing.
    """
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(
                target=_prepare, args=(tuple(modules),), name="tensorflow-import", daemon=True
            )
            _thread.start()


def wait(modules: Sequence[str] = ()) -> None:
    """Blocks until ``start_import``'s work is done; without it, does that work now.

    Also imports ``modules`` (at once if already imported). Raises what the import raised.
    """
    start_import(modules)
    assert _thread is not None
    _thread.join()
    if _error is not None:
        raise _error
    for name in modules:
        importlib.import_module(name)


def settle() -> None:
    """Waits for a background import ``start_import`` began, ignoring its errors: a program that
    exits while TensorFlow is being imported in another thread can crash at shutdown."""
    if _thread is not None:
        _thread.join()
