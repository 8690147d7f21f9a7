"""Tests of plugins.tensorflow_setup: TensorFlow imported in the background, errors re-raised."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (the module keeps one import per process)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_background_import_then_wait():
    proc = run(
        """
        import sys, threading
        from plugins import tensorflow_setup
        tensorflow_setup.start_import(["clu.metric_writers"])
        assert "tensorflow-import" in [t.name for t in threading.enumerate()]
        tensorflow_setup.wait(["clu.metric_writers"])
        import tensorflow as tf
        assert "clu.metric_writers" in sys.modules
        assert tf.config.get_visible_devices("GPU") == []
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_wait_without_start_imports_now():
    proc = run(
        """
        import sys
        from plugins import tensorflow_setup
        assert "tensorflow" not in sys.modules
        tensorflow_setup.wait(["json"])
        assert "tensorflow" in sys.modules
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_import_error_in_the_thread_is_raised_by_wait():
    proc = run(
        """
        from plugins import tensorflow_setup
        tensorflow_setup.start_import(["no_such_module_for_this_test"])
        for attempt in range(2):  # every wait raises it, not only the first
            try:
                tensorflow_setup.wait()
            except ModuleNotFoundError as error:
                print(error.name)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["no_such_module_for_this_test"] * 2
