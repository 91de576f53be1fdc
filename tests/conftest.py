"""Test setup. XLA_FLAGS must be set before jax is imported anywhere: 8 emulated CPU devices let every
test build 1-device and (data=2, fsdp=2, tensor=2) meshes in the same process."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A hub lookup hangs ~50 s on an offline machine; tests build every model and tokenizer they use.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Trainer subprocesses leave glibc at its defaults: with freed memory kept, CI workers grew until OOM-killed.
os.environ.setdefault("DPO_JAX_HOST_MALLOC", "system")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests live in folders that mirror dpo_jax's wings (core, data, train, interop, experiments, benchmarks); their
# shared helpers (batches.py, trainer_runs.py, paths.py, ...) stay here, importable from every folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, (
      f"expected 8 emulated CPU devices, got {jax.device_count()}: jax was imported before tests/conftest.py "
      f"set XLA_FLAGS. Run pytest from the repo root.")
