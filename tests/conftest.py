"""Test setup: 8 fake CPU devices in the test process and shared fixtures.

The device count is set through `jax_num_cpu_devices` (before any JAX backend starts), not through
`XLA_FLAGS`, so subprocesses the tests start (CLI runs) see one CPU device unless they ask for more.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# One persistent XLA compilation cache per test run, shared by both xdist workers and every CLI
# subprocess a test starts (they inherit the environment): many tests compile the same tiny
# programs (a resume test runs the same config three times), and a cache hit is the compiled
# executable itself, so results are bit-for-bit those of a fresh compile. The controller process
# (the first to import this file) makes the folder; workers and subprocesses find it set.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _CACHE = tempfile.mkdtemp(prefix="selfplay_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from tests.task_helpers import IDS, TASK_SPECS  # noqa: E402


@pytest.fixture(scope="module", params=TASK_SPECS[:4], ids=IDS[:4])
def task_and_tok(request, tmp_path_factory):
  """(task, its tokenizer) for four of the built-in task variants (test_encoding.py and
  test_verifiers.py; a tokenizer takes ~0.2 s to train)."""
  from selfplay_jax.data import tasks  # pylint: disable=import-outside-toplevel
  name, kwargs = request.param
  task = tasks.get_task(name, **kwargs)
  return task, tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok"))


# The files that take longest (minutes each, mostly end-to-end training runs; see the
# `--durations` table of a full run) go first: `--dist loadfile` hands files to the two workers in
# collection order, so a long file collected last (alphabetically) would run alone at the end.
HEAVY_FIRST = ("test_recipes.py", "test_self_rewarding.py", "test_train.py", "test_reliability.py",
               "test_resume_kill.py", "test_docs.py", "test_config_keys.py", "test_multihost.py",
               "test_lora.py", "test_bring_your_own.py", "test_reward_fns.py",
               "test_population.py", "test_curriculum.py", "test_bench_accelerator.py",
               "test_label_free.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable otherwise
