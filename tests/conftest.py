"""Test setup. XLA_FLAGS must be set before jax is imported anywhere: 8 emulated CPU devices let every
test build 1-device and (data=2, fsdp=2, tensor=2) meshes in the same process."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU's LLVM backend at -O0: the tests' programs are small and compile-bound (a tiny trainer run takes 16 s
# instead of 21, the SmolLM2 step test 58 s instead of 85), and every comparison a test makes is between programs
# built the same way or against torch with a tolerance. Trainer subprocesses keep it (tests/subprocess_env.py).
# Set the flag yourself in XLA_FLAGS (e.g. =2, XLA's default) to test at full optimization.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A hub lookup hangs ~50 s on an offline machine; tests build every model and tokenizer they use.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Trainer subprocesses leave glibc at its defaults: with freed memory kept, CI workers grew until OOM-killed.
os.environ.setdefault("DPO_JAX_HOST_MALLOC", "system")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session, both pytest workers and every trainer subprocess they start:
# the tests build the same programs again and again (each trainer run of the tiny config compiles the same SFT, DPO,
# eval and sampling steps; rebuilt closures miss jax's in-memory cache), and a cached executable is the same code,
# so results are unchanged. Entries are keyed by the program, jax version and devices, so a stale one is never hit.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dpo_jax_tests_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny programs add up too
# pi_ref's cached log-probs (dpo_jax/train/reference_cache.py) go to a folder of this session, never ~/.cache.
os.environ.setdefault("DPO_JAX_REFERENCE_CACHE", tempfile.mkdtemp(prefix="dpo_jax_tests_reference_cache_"))

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
