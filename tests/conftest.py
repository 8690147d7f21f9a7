"""Test setup: 8 simulated CPU devices, set before anything imports jax."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Suites that run inside a generated project (the noxfile's template session copies them there).
collect_ignore = ["project_suites"]
