"""Test setup: 8 fake CPU devices in the test process and shared fixtures.

The device count is set through `jax_num_cpu_devices` (before any JAX backend starts), not through
`XLA_FLAGS`, so subprocesses the tests start (CLI runs) see one CPU device unless they ask for more.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_num_cpu_devices", 8)
