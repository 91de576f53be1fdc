"""How the command-line entry points report an error the project raises on purpose: one line, exit code 2.

An error raised on purpose is one that a `raise` statement in dpo_jax itself produced: a config value out of range,
a bad data row, a workdir in use, a missing path, a NaN loss. Its message already names the field (or file, row)
and the fix, so `python -m dpo_jax.train` and the frontier print `error: <message>` to stderr and exit with
`EXIT_CODE` instead of a traceback. Anything else (a bug here, an error inside jax or a library, a bare re-raise)
keeps its full traceback. `DPO_JAX_TRACEBACK=1` shows the traceback of on-purpose errors too.
"""

from __future__ import annotations

import linecache
import os
import sys
from typing import Any, Callable

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # dpo_jax/
EXIT_CODE = 2


def raised_on_purpose(err: BaseException) -> bool:
  """True when the innermost frame of `err`'s traceback is a `raise <something>` line of a dpo_jax module (jax's
  traceback filtering keeps that frame for errors raised while tracing our code under jit)."""
  tb, last = err.__traceback__, None
  while tb is not None:
    last, tb = tb, tb.tb_next
  if last is None:
    return False
  path = os.path.abspath(last.tb_frame.f_code.co_filename)
  if not path.startswith(PACKAGE_DIR + os.sep):
    return False
  return linecache.getline(path, last.tb_lineno).strip().startswith("raise ")


def exit_on_purpose_errors(fn: Callable[..., Any], *args: Any, passthrough: tuple[type, ...] = (),
                           **kwargs: Any) -> Any:
  """`fn(*args, **kwargs)`; an error raised on purpose becomes one `error: ...` line on stderr and exit code 2.
  `passthrough`: exception types the caller handles itself (the trainer's `Preempted`, a clean exit)."""
  try:
    return fn(*args, **kwargs)
  except Exception as err:  # noqa: BLE001  (re-raised unless it is one of ours)
    if (isinstance(err, passthrough) or os.environ.get("DPO_JAX_TRACEBACK") == "1"
        or not raised_on_purpose(err)):
      raise
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)
