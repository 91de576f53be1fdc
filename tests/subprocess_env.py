"""Environments for the processes tests start (the trainer as a user runs it, launch scripts, the device check)."""

import os

EMULATED_DEVICES = "--xla_force_host_platform_device_count="


def without_emulated_devices(**extra: str) -> dict:
  """os.environ without conftest's 8 emulated CPU devices (one device, as a user's process has), keeping the
  tests' other XLA flags (the -O0 backend of tests/conftest.py), plus `extra`."""
  env = dict(os.environ, **extra)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(EMULATED_DEVICES)]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  return env


def with_emulated_devices(count: int, **extra: str) -> dict:
  """os.environ with `count` emulated CPU devices instead of conftest's 8, the tests' other XLA flags kept."""
  env = without_emulated_devices(**extra)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" {EMULATED_DEVICES}{count}").strip()
  return env
