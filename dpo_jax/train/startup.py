"""Seconds from the command to a stage's first step, split into where they go: load, tokenize, compile, first step.

The trainer times its start-up phases with `phase('load')` (tokenizer, checkpoint weights, pi_ref),
`phase('tokenize')` (reading and tokenizing the pairs) and `phase('evaluate')` (the held-out NLL of the starting
point, before any training), and `train_loop` prints `first_step_lines` at each stage's first step: the first call
of a jitted step compiles it (or reads it from the persistent compilation cache, `compile_cache.py`) before
dispatching, and blocking on that step's metrics then times its execution. One console line each, from process 0
(SmolLM2-135M, `configs/hf_dpo.py`, cold, on a 2-core CPU):

    start-up: load 7.24 s (tokenizer, weights)
    start-up: tokenize 0.55 s (pairs read and tokenized)
    start-up: evaluate 0.00 s (held-out NLL of the starting point, before training)
    dpo start-up: compile 7.04 s (persistent cache: 0 read, 1 compiled and written; /tmp/w/cc_smol3)
    dpo start-up: first step 4.23 s; 22.68 s from the command to the end of the first dpo step (3.63 s in none of
    these: imports, mesh, the FLOP/s probe)

Load, tokenize and evaluate are printed once, with the first stage that steps, and the seconds left over; every
stage prints its compile and first step.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Callable, Iterator

_IMPORTED = time.perf_counter()
_PHASES = {"load": "tokenizer, weights", "tokenize": "pairs read and tokenized",
           "evaluate": "held-out NLL of the starting point, before training"}
_seconds: dict[str, float] = {}
_reported = False


def seconds_since_start() -> float:
  """Seconds since this process started (Linux: /proc; elsewhere since this module was imported)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, 'starttime', in clock ticks after boot
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _IMPORTED


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
  """Add the block's wall time to start-up phase `name` ('load' or 'tokenize')."""
  if name not in _PHASES:
    raise ValueError(f"unknown start-up phase {name!r}; one of {list(_PHASES)}")
  t0 = time.perf_counter()
  try:
    yield
  finally:
    _seconds[name] = _seconds.get(name, 0.0) + time.perf_counter() - t0


def timed(name: str) -> Callable:
  """Decorator: the function's calls count toward phase `name`, until their (jax) results are ready."""
  def wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
      import jax
      with phase(name):
        return jax.block_until_ready(fn(*args, **kwargs))
    return run
  return wrap


def reset() -> None:
  """Forget the phases timed so far (a new run in the same process: a notebook, a test)."""
  global _reported
  _seconds.clear()
  _reported = False


def first_step_lines(stage: str, compile_s: float, step_s: float, hits: int, misses: int, cache_dir: str) -> list[str]:
  """The console lines for `stage`'s first step (module docstring); load and tokenize only the first time."""
  global _reported
  lines, rest = [], ""
  total = seconds_since_start()
  if not _reported:
    lines += [f"start-up: {name} {_seconds.get(name, 0.0):.2f} s ({what})" for name, what in _PHASES.items()]
    rest = (f" ({total - sum(_seconds.values()) - compile_s - step_s:.2f} s in none of these: imports, mesh, the "
            "FLOP/s probe)")
    _reported = True
  cache = (f"persistent cache: {hits} read, {misses} compiled and written; {cache_dir}" if cache_dir
           else "persistent cache off")
  lines.append(f"{stage} start-up: compile {compile_s:.2f} s ({cache})")
  lines.append(f"{stage} start-up: first step {step_s:.2f} s; {total:.2f} s from the command to the end of the "
               f"first {stage} step{rest}")
  return lines
