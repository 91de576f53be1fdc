"""JAX's persistent compilation cache for the trainer: a rerun, a resume and every sweep member load compiled steps.

A jitted step compiles the first time it is called (seconds on CPU for the tiny config, minutes for a large model
on a TPU). jax can write each compiled executable to a folder, keyed by the program, the jax / XLA version, the
devices and the compile options, and read it back instead of compiling when the same program comes again: a
changed model, batch shape, mesh or jax version is a different key, so a stale entry is never used. The trainer
turns it on by default (`config.perf.compile_cache`):

- 'auto': `$JAX_COMPILATION_CACHE_DIR` when set (jax's own variable; the tests point every trainer subprocess at one
  folder this way), else `$XDG_CACHE_HOME/dpo_jax/xla` (`~/.cache/dpo_jax/xla`).
- a path: that folder (on a multi-host job each host writes its own local folder, or a shared one).
- '': off; every run compiles.

jax stores only programs whose compile took at least `jax_persistent_cache_min_compile_time_secs` (1 s by default,
`$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`): the train, eval and sampling steps of any real model, not the small
helpers that compile in milliseconds. `Counter` counts hits and misses through `jax.monitoring`, for the start-up
line that says whether a compile was read or done.
"""

from __future__ import annotations

import os
import threading

import jax

_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def resolve(setting: str) -> str:
  """The folder `setting` names (module docstring), '' when the cache is off."""
  if setting != "auto":
    return os.path.expanduser(setting)
  env = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if env:
    return env
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dpo_jax", "xla")


def enable(setting: str) -> str:
  """Point jax's persistent cache at `resolve(setting)` (or turn it off for '') -> the folder, '' when off.

  Call it before the first compile of the run. A process that already used another folder (a notebook or a test
  running the trainer twice) is reset to the new one.
  """
  folder = resolve(setting)
  if folder:
    os.makedirs(folder, exist_ok=True)
  if (jax.config.jax_compilation_cache_dir or "") != folder or bool(folder) != jax.config.jax_enable_compilation_cache:
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_enable_compilation_cache", bool(folder))
    jax.config.update("jax_compilation_cache_dir", folder or None)
    compilation_cache.reset_cache()  # jax initialises the cache once per process: from the new folder next compile
  return folder


def folder() -> str:
  """The folder jax's persistent cache uses now, '' when off."""
  return (jax.config.jax_compilation_cache_dir or "") if jax.config.jax_enable_compilation_cache else ""


class Counter:
  """Persistent-cache hits and misses since it was made (`jax.monitoring` events; every thread's compiles)."""

  _lock = threading.Lock()
  _counts = {_HIT: 0, _MISS: 0}
  _installed = False

  def __init__(self):
    with Counter._lock:
      if not Counter._installed:  # jax keeps listeners for the process's life: one for all counters
        jax.monitoring.register_event_listener(Counter._on_event)
        Counter._installed = True
      self._start = dict(Counter._counts)

  @staticmethod
  def _on_event(event: str, **_: object) -> None:
    if event in Counter._counts:
      with Counter._lock:
        Counter._counts[event] += 1

  @property
  def hits(self) -> int:
    return Counter._counts[_HIT] - self._start[_HIT]

  @property
  def misses(self) -> int:
    return Counter._counts[_MISS] - self._start[_MISS]
