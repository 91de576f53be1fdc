"""Config checks that need no devices and no data: command-line field names and value ranges.

  check_override_flags(argv)   --config.a.b=... names a field of the config file (else: the closest name)
  check_ranges(config)         every numeric field inside its valid range (else: the field, value and range)

ml_collections rejects an unknown override too, but with a traceback from inside absl's flag parsing; this
check runs first and says which field was meant. Cross-field checks (batch sizes vs the mesh, lengths, loss
options) stay in train.validate_config, which calls check_ranges.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from typing import Any, Callable, Sequence

from dpo_jax.data import preference

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")

_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_UNIT_OPEN = (lambda v: 0 <= v < 1, "in [0, 1)")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")

# field -> (test, the range in words); fields a config does not have are not checked.
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "seed": _NON_NEGATIVE,
    "batch_size": _AT_LEAST_1,
    "max_length": (lambda v: v >= 2, ">= 2 (a prompt token and a response token)"),
    "max_prompt_length": _AT_LEAST_1,
    "log_every_steps": _AT_LEAST_1,
    "checkpoint_every_steps": _AT_LEAST_1,
    "max_checkpoints": _AT_LEAST_1,
    "loss.beta": _POSITIVE,
    "optim.learning_rate": _POSITIVE,
    "optim.warmup_steps": _NON_NEGATIVE,
    "optim.total_steps": _AT_LEAST_1,
    "optim.end_lr_ratio": _UNIT,
    "optim.b1": _UNIT_OPEN,
    "optim.b2": _UNIT_OPEN,
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "optim.grad_accum_steps": _AT_LEAST_1,
    "lora.rank": (lambda v: v >= 0, ">= 0 (0 = full fine-tuning)"),
    "lora.alpha": _POSITIVE,
    "lora.dropout": _UNIT_OPEN,
    "sft.steps": (lambda v: v >= 0, ">= 0 (0 skips SFT)"),
    "sft.batch_size": _AT_LEAST_1,
    "sft.learning_rate": _POSITIVE,
    "sft.warmup_steps": _NON_NEGATIVE,
    "eval.every_steps": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "eval.batch_size": _AT_LEAST_1,
    "eval.num_prompts": (lambda v: v >= 0, ">= 0 (0 skips sampling)"),
    "eval.samples_per_prompt": _AT_LEAST_1,
    "eval.max_new_tokens": _AT_LEAST_1,
    "eval.temperature": _POSITIVE,
    "model.vocab_size": _AT_LEAST_1,
    "model.hidden_size": _AT_LEAST_1,
    "model.intermediate_size": _AT_LEAST_1,
    "model.num_layers": _AT_LEAST_1,
    "model.num_heads": _AT_LEAST_1,
    "model.num_kv_heads": _AT_LEAST_1,
    "model.rope_theta": _POSITIVE,
    "model.rms_norm_eps": _POSITIVE,
    "model.initializer_range": _NON_NEGATIVE,
    "model.logits_chunk_size": (lambda v: v >= 0, ">= 0 (0 = all positions at once)"),
}


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
  """(found, value) of a dotted field."""
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False, None
    node = node[part]
  return True, node


def check_ranges(config: Any) -> None:
  """ValueError naming the first field outside its range (RANGES), its value and the valid range."""
  for path, (test, words) in RANGES.items():
    found, value = _lookup(config, path)
    if not found or value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not test(value):
      raise ValueError(f"config.{path}={value!r} is out of range: it must be a finite number {words}. Fix "
                       f"--config.{path}.")
  found, value = _lookup(config, "data.on_bad_row")
  if found:
    preference.check_on_bad_row(value)


def closest(name: str, names: Any) -> str:
  """' Did you mean 'x'?' for the known name closest to a misspelled `name`, else ''."""
  match = difflib.get_close_matches(str(name), [str(n) for n in names], n=1, cutoff=0.6)
  return f" Did you mean '{match[0]}'?" if match else ""


def load_config_file(spec: str) -> Any:
  """The ConfigDict of 'path/to/config.py[:arg]', built as ml_collections' config flag builds it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_dpo_jax_config_check", path)
  if module_spec is None or not os.path.isfile(path):
    raise SystemExit(f"error: --config={spec!r}: no such config file; pass e.g. --config=configs/default.py:tiny.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _paths(node: Any, prefix: str = "config") -> list[str]:
  """Every dotted field path of a ConfigDict, groups and values alike."""
  out = []
  for key in node.keys():
    out.append(f"{prefix}.{key}")
    if hasattr(node[key], "keys"):
      out += _paths(node[key], f"{prefix}.{key}")
  return out


def elsewhere(config: Any, name: str) -> str:
  """" Did you mean config.batch_size (or config.sft.batch_size)?" for fields of that name, or the closest name,
  in other blocks of the config; '' if none is close."""
  paths = _paths(config)
  last = {p: p.rsplit(".", 1)[1] for p in paths}
  exact = [p for p in paths if last[p] == name]
  if not exact:
    close = difflib.get_close_matches(name, sorted(set(last.values())), n=1, cutoff=0.75)
    exact = [p for p in paths if close and last[p] == close[0]]
  if not exact:
    return ""
  return f" Did you mean {exact[0]}" + (f" (or {', '.join(exact[1:])})" if exact[1:] else "") + "?"


def unknown_field(config: Any, path: str) -> str | None:
  """None when `config` has the dotted field `path`, else a message naming the first unknown part and the
  closest existing name at that level."""
  node, seen = config, "config"
  for part in path.split("."):
    if not hasattr(node, "keys"):
      return f"{seen} is a value ({node!r}), not a group of fields, so --config.{path} names nothing."
    if part not in node:
      hint = closest(part, node.keys()) or elsewhere(config, part)
      fields = ", ".join(sorted(node.keys()))
      return (f"--config.{path}: {seen} has no field '{part}'.{hint} Its fields: {fields}. "
              "See configs/default.py for every field and its meaning.")
    node, seen = node[part], f"{seen}.{part}"
  return None


def check_override_flags(argv: Sequence[str], default_config: str = DEFAULT_CONFIG) -> None:
  """SystemExit with a one-line message (no traceback) when a --config.<field> override names a field the
  config file does not have, suggesting the closest name. Call it with sys.argv[1:] before absl parses flags;
  other flags are ignored here (absl reports those). `default_config`: the file used without --config."""
  spec, names = default_config, []
  args = list(argv)
  for k, arg in enumerate(args):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and k + 1 < len(args):
      spec = args[k + 1]
    elif arg.startswith(("--config.", "--noconfig.")):
      names.append(arg.split("=", 1)[0].split("config.", 1)[1])
  if not names:
    return
  config = load_config_file(spec)
  for name in names:
    message = unknown_field(config, name)
    if message:
      raise SystemExit(f"error: {message}")
