"""host_memory: glibc keeps freed memory for the next step's allocations, so it is not faulted in again."""

import os
import subprocess
import sys
import textwrap

import pytest

from dpo_jax.train import host_memory

# A fresh process: a thread mallocs 96 MiB (above glibc's mmap threshold and above the 64 MiB a thread's own
# arena can hold), touches every page, frees it, and does it again. The minor page faults of each round show
# whether the freed memory was kept. `early`: the settings come before the thread first allocates, `late`:
# after (the thread already has its own arena), `system`: never.
_ROUNDS = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from dpo_jax.train import host_memory
    mode = sys.argv[1]
    libc = host_memory._glibc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if mode == "early":
      assert host_memory.keep_freed_memory()
    size, faults, ready, go = 96 << 20, [], threading.Event(), threading.Event()

    def work():
      libc.free(libc.malloc(64))  # the thread's first allocation picks its arena
      ready.set()
      go.wait()
      for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(p)

    thread = threading.Thread(target=work)
    thread.start()
    ready.wait()
    if mode == "late":
      assert host_memory.keep_freed_memory()
    go.set()
    thread.join()
    print(*faults)
""")
PAGES = (96 << 20) // 4096


def _faults(mode):
  out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
  return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(host_memory._glibc() is None, reason="the C library is not glibc")
def test_kept_memory_is_not_faulted_in_again():
  first, again = _faults("system")
  assert first >= PAGES // 2 and again >= PAGES // 2, (first, again)  # mmap'd, unmapped on free, faulted again
  first, again = _faults("early")
  assert first >= PAGES // 2 and again < PAGES // 100, (first, again)  # the second malloc reuses the pages


@pytest.mark.skipif(host_memory._glibc() is None, reason="the C library is not glibc")
def test_a_thread_arena_made_before_the_settings_still_refaults():
  # Why the entry points call configure() before importing jax: XLA's threads would otherwise keep arenas
  # that mmap every large buffer (the small benchmark config: 1.4M faults a step with the settings made late).
  first, again = _faults("late")
  assert first >= PAGES // 2 and again >= PAGES // 2, (first, again)


@pytest.fixture
def kept(monkeypatch):
  """Calls of keep_freed_memory, recorded instead of made: made in this pytest process, the settings would keep
  every later test's freed memory in one never-trimmed heap (a worker grew to ~20 GB and was OOM-killed)."""
  calls = []
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # configure() appends to it: restored after
  return calls


def test_modes_and_the_environment_variable(monkeypatch, kept):
  assert host_memory.configure("system") is False and not kept  # leaves glibc alone
  assert host_memory.configure("keep") is True and len(kept) == 1
  monkeypatch.setenv(host_memory.ENV, "system")
  assert host_memory.configure() is False
  monkeypatch.setenv(host_memory.ENV, "tcmalloc")
  with pytest.raises(ValueError, match=r"DPO_JAX_HOST_MALLOC='tcmalloc'; choose one of \['auto', 'keep', 'system'\]"):
    host_memory.configure()
  with pytest.raises(ValueError, match=r"--host_malloc='on'; choose one of"):
    host_memory.configure("on", source="--host_malloc")


@pytest.mark.parametrize("platforms, expected", [("cpu", False), ("cuda", True), ("tpu", True), ("cpu,cuda", True)])
def test_auto_keeps_memory_only_without_an_accelerator(monkeypatch, kept, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_memory.accelerator_expected() is expected
  monkeypatch.setenv(host_memory.ENV, "auto")
  assert host_memory.configure() is (not expected) and len(kept) == (not expected)


def test_libtpu_without_tpu_chips_is_no_accelerator(monkeypatch):
  """The test and tpu extras install libtpu (the dry run's TPU compiler) on CPU machines: only a TPU VM's chips make
  it an accelerator."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(host_memory.topology, "compiler_available", lambda: True)
  monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(host_memory.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(host_memory.topology, "tpu_present", lambda: False)
  assert host_memory.accelerator_expected() is False
  monkeypatch.setattr(host_memory.topology, "tpu_present", lambda: True)
  assert host_memory.accelerator_expected() is True


def test_the_entry_points_set_glibc_before_jax_is_imported():
  """configure_at_startup must run before jax starts XLA's threads (the test above): importing host_memory, and
  topology beside it in dpo_jax/train/__main__.py, imports no jax and starts no thread."""
  code = ("import os, sys\nfrom dpo_jax.train import host_memory, topology\n"
          "tasks = '/proc/self/task'  # Linux: one entry per thread\n"
          "print(sorted(m for m in ('jax', 'jaxlib', 'numpy') if m in sys.modules),\n"
          "      len(os.listdir(tasks)) if os.path.isdir(tasks) else 1)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["[]", "1"], out.stdout


def test_a_bad_environment_value_stops_the_trainer_with_one_line():
  env = dict(os.environ, DPO_JAX_HOST_MALLOC="tcmalloc")
  out = subprocess.run([sys.executable, "-m", "dpo_jax.train", "--helpshort"], capture_output=True, text=True,
                       env=env)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip() == ("error: DPO_JAX_HOST_MALLOC='tcmalloc'; choose one of ['auto', 'keep', "
                                "'system'].")


def test_cpu_programs_are_ordered_for_memory_unless_xla_flags_say_otherwise(monkeypatch):
  flag = host_memory.CPU_SCHEDULER_FLAG
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert host_memory.memory_ordered_cpu_steps() is True
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {flag}=false"
  assert host_memory.memory_ordered_cpu_steps() is True and os.environ["XLA_FLAGS"].count(flag) == 1
  monkeypatch.setenv("XLA_FLAGS", f"{flag}=true")  # the user's own choice stays
  assert host_memory.memory_ordered_cpu_steps() is False and os.environ["XLA_FLAGS"] == f"{flag}=true"
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  monkeypatch.setenv("XLA_FLAGS", "")
  assert host_memory.memory_ordered_cpu_steps() is False and os.environ["XLA_FLAGS"] == ""


MEMORY_PROBE = """
import os, sys
sys.path.insert(0, os.getcwd())
from dpo_jax.train import host_memory
if sys.argv[1] == "memory":
  host_memory.memory_ordered_cpu_steps()
import jax, numpy as np
from dpo_jax import logprobs, model as model_lib
cfg = model_lib.ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                            num_kv_heads=2, remat="full")
ids = np.ones((8, 256), np.int32)
batch = dict(input_ids=ids, attention_mask=ids, loss_mask=ids, positions=np.broadcast_to(np.arange(256), ids.shape))
model = model_lib.make_model(cfg)
grad = jax.jit(jax.grad(lambda p: logprobs.sequence_logps(model, p, batch).logps.sum()))
print(grad.lower(model_lib.abstract_params(cfg)).compile().memory_analysis().temp_size_in_bytes)
"""


@pytest.mark.slow
def test_the_memory_order_is_what_makes_remat_save_memory_on_cpu():
  """remat='full' keeps only each layer's input for the backward; XLA:CPU's concurrency-optimised order (its
  default) still holds most of what it recomputes at once, the memory-minimising one does not."""
  from paths import REPO_ROOT
  from subprocess_env import without_emulated_devices
  temps = {}
  for order in ("default", "memory"):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, order], cwd=REPO_ROOT, capture_output=True, text=True,
                         env=without_emulated_devices(JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    temps[order] = int(out.stdout.split()[-1])
  assert temps["memory"] < 0.75 * temps["default"], temps
