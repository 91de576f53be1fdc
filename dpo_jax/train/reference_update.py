"""TR-DPO reference updates (Gorbatovski et al. 2024, "Learn your reference model for real good alignment").

Every `tau` optimizer steps the reference moves toward the policy:
    soft (TR-DPO^alpha):  ref <- alpha * policy + (1 - alpha) * ref
    hard (TR-DPO^tau):    ref <- policy            (the soft rule with alpha = 1)
`config.ref_update.mode='off'` (the default) keeps pi_ref frozen, as the seed's DPO does.

In the trainer the moving reference lives in its own buffers, never the policy's (the state is donated by the
step): `update_reference` always writes fresh arrays. It is checkpointed beside the train state as one pytree
(`TrackedState`), so a resumed run continues with exactly the reference it had. The frozen pi_ref the run
started from is kept too: held-out metrics and the sampled KL are measured against it.

With LoRA (`config.lora.rank > 0`) the policy is the frozen base plus adapters, and the moving reference is a second,
frozen set of adapters over the same base (`lora.LoraParams(base, ref_adapters, spec)`, dropout off). It starts at
zero delta (the base: LoRA's usual pi_ref, bit for bit) and each update keeps the best rank-r approximation of the
mixed deltas (`lora.mix_adapters`; hard updates and any mix of rank <= r are exact). The checkpoint then holds the
reference adapters, not a second copy of the base.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax import lora as lora_lib, step as step_lib
from dpo_jax.train import checkpoint

MODES = ("off", "soft", "hard")


def update_reference(reference_params: Any, policy_params: Any, alpha: float) -> Any:
  """alpha * policy + (1 - alpha) * reference, leaf by leaf, in fp32, cast back to the reference's dtype.

  alpha = 1.0 (hard update) is an exact copy of the policy, in new buffers. Pure: jit it with the reference's
  shardings as in and out shardings (`jit_update`); the result never aliases either input.
  """
  if alpha == 1.0:
    return jax.tree.map(lambda r, p: jnp.array(p, dtype=r.dtype, copy=True), reference_params, policy_params)

  def mix(r, p):
    return (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)).astype(r.dtype)
  return jax.tree.map(mix, reference_params, policy_params)


def should_update(step: int, tau: int) -> bool:
  """True after optimizer update number `step` (1-based: updates applied so far) when it is a multiple of tau."""
  return step > 0 and step % tau == 0


def mixing_weight(cfg: Mapping[str, Any]) -> float:
  """alpha of a `config.ref_update` block: its alpha for 'soft', 1.0 for 'hard'."""
  return 1.0 if cfg["mode"] == "hard" else float(cfg["alpha"])


def validate_config(cfg: Mapping[str, Any], *, uses_reference: bool, reference_logps: bool, loss_label: Any) -> None:
  """ValueError naming the `config.ref_update` field (or the field it conflicts with) and the fix."""
  mode = cfg["mode"]
  if mode not in MODES:
    raise ValueError(f"config.ref_update.mode={mode!r}; choose one of {MODES}.")
  if mode == "off":
    return
  if mode == "soft" and not 0.0 < cfg["alpha"] <= 1.0:
    raise ValueError(f"config.ref_update.alpha={cfg['alpha']!r} must be in (0, 1]: the policy's weight in "
                     f"ref <- alpha * policy + (1 - alpha) * ref (0.6 in Gorbatovski et al. 2024).")
  if not isinstance(cfg["tau"], int) or cfg["tau"] < 1:
    raise ValueError(f"config.ref_update.tau={cfg['tau']!r} must be an integer >= 1 (optimizer steps between updates).")
  if reference_logps:
    raise ValueError(f"config.ref_update.mode={mode!r} moves the reference model, but config.data.reference_logps=True "
                     f"trains on fixed precomputed reference log-probs. Set --config.ref_update.mode=off, or "
                     f"--config.data.reference_logps=False to run the reference in the step.")
  if not uses_reference:
    raise ValueError(f"config.ref_update.mode={mode!r} updates pi_ref, but config.loss.type={loss_label!r} is "
                     f"reference-free (no pi_ref is used). Set --config.ref_update.mode=off.")


def jit_update(alpha: float, reference_shardings: Any) -> Callable[[Any, Any], Any]:
  """`update(reference, policy) -> new reference`, jitted onto the reference's shardings; nothing is donated
  (the old reference is freed when the caller drops it; the policy stays the step's)."""
  return jax.jit(lambda r, p: update_reference(r, p, alpha), in_shardings=(reference_shardings, reference_shardings),
                 out_shardings=reference_shardings)


def zero_reference(adapters: Any, adapter_shardings: Any) -> Any:
  """The LoRA moving reference at the start: adapters like `adapters` at zero delta (pi_ref = the base), in new
  buffers laid out in `adapter_shardings` (call it before the policy's adapters are donated to the state)."""
  return jax.jit(lora_lib.zero_adapters, out_shardings=adapter_shardings)(adapters)


def jit_lora_update(alpha: float, *, stacked: bool, adapter_shardings: Any) -> Callable[[Any, Any], Any]:
  """`update(ref_adapters, policy_adapters) -> new ref_adapters` (`lora.mix_adapters`: the mixed deltas truncated to
  rank r), jitted onto the adapters' shardings; nothing is donated. `stacked`: the model's `cfg.scan_layers`."""
  return jax.jit(lambda r, p: lora_lib.mix_adapters(r, p, alpha, stacked=stacked),
                 in_shardings=(adapter_shardings, adapter_shardings), out_shardings=adapter_shardings)


class TrackedState(NamedTuple):
  """A `step.TrainState` plus the moving reference: one pytree, so one checkpoint holds both."""
  step: jax.Array  # [] int32, optimizer updates applied so far
  params: Any  # policy params (with LoRA: the adapters)
  opt_state: Any
  reference: Any  # the reference the next step uses (with LoRA: its adapters over the shared base)


def tracking_step(train_step: Callable, update: Callable[[Any, Any], Any], tau: int) -> Callable:
  """`step_fn(tracked, batch) -> (tracked, metrics)` for `train_loop`: one `train_step(state, reference, batch)`,
  then, after every tau-th update, `reference <- update(reference, policy)`.

  The update count is kept on the host (read from the state once, at the first call), so deciding whether to
  update never waits for the device.
  """
  count = {"step": None}

  def step_fn(tracked: TrackedState, batch):
    if count["step"] is None:
      count["step"] = int(jax.device_get(tracked.step))
    state, metrics = train_step(step_lib.TrainState(tracked.step, tracked.params, tracked.opt_state),
                                tracked.reference, batch)
    count["step"] += 1
    reference = tracked.reference
    if should_update(count["step"], tau):
      reference = update(reference, state.params)
    return TrackedState(state.step, state.params, state.opt_state, reference), metrics

  return step_fn


def holds_reference(stored_names: Any) -> bool:
  """Whether a checkpoint's array names (`checkpoint.stored_arrays`) include a moving reference."""
  return any(name.startswith("reference.") for name in stored_names)


def check_resume(mngr: Any, mode: str) -> None:
  """ValueError when the newest checkpoint's layout disagrees with `config.ref_update.mode` (one holds a moving
  reference and the other does not): resuming would silently restart or drop the reference's history."""
  latest = mngr.latest_step()
  if latest is None:
    return
  try:
    names = checkpoint.stored_arrays(mngr, latest)
  except Exception:  # an unreadable step: checkpoint.restore_latest reports it and falls back
    return
  if holds_reference(names) != (mode != "off"):
    was = ("no moving reference (ref_update.mode 'off')" if mode != "off"
           else "a moving reference (ref_update.mode 'soft' or 'hard')")
    raise ValueError(f"checkpoint step {latest} in {mngr.directory} was written with {was}, but this run has "
                     f"config.ref_update.mode={mode!r}. Resume with the ref_update config it was trained with, or "
                     f"pass another --workdir.")


def start_state(mngr: Any, abstract_state: step_lib.TrainState, fresh: Callable[[], step_lib.TrainState],
                reference: Any, check_meta: Callable[[dict], None] | None = None) -> TrackedState:
  """The newest checkpoint of the stage, its moving reference included (resume), else `fresh()` with `reference`
  (the frozen pi_ref's arrays, or with LoRA `zero_reference`'s adapters: never donated by the step, replaced by new
  buffers at the first update).
  `check_meta(meta)` vets a checkpoint's meta before it is resumed (the trainer's changed-config check)."""
  abstract = TrackedState(*abstract_state, reference=abstract_state.params)  # the reference is laid out like params
  restored = checkpoint.restore_latest(mngr, abstract)
  if restored is None:
    return TrackedState(*fresh(), reference=reference)
  state, meta = restored
  if check_meta is not None:
    check_meta(meta)
  print(f"{meta.get('stage', '?')}: resuming from step {int(jax.device_get(state.step))} (data position "
        f"{meta.get('data_step')}) with its moving reference in {mngr.directory}")
  return TrackedState(*state)
