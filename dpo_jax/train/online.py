"""Online and iterative DPO (`--config.stage=online_dpo`): the policy samples, a judge labels, DPO trains.

    python -m dpo_jax.train --config.stage=online_dpo --workdir runs/sft_done             # online DPO, r* judge
    python -m dpo_jax.train --config.stage=online_dpo --config.online.samples_per_prompt=8 \\
        --config.online.steps_per_round=50 --config.online.keep_pairs=True                   # iterative DPO

Each round r = 0 .. online.rounds - 1:

1. Prompts: online.prompts_per_round of the training data's distinct prompts (`round_prompts`: passes over them,
   each pass shuffled; a pure function of the seed and r).
2. Samples: online.samples_per_prompt = n responses per prompt from the current policy (`rollout.jit_rollout`:
   KV-cache sampling, cut after EOS, and teacher-forced log-probs under pi and pi_ref for the logged KL). The
   sampling key is fold_in(seed, r).
3. Judge (dpo_jax/train/judges.py): one score per response, `[P, n]`.
4. Pairs (`best_vs_worst`): each prompt's best response against its worst. A prompt whose best and worst scores
   differ by <= online.tie_margin gives no pair (a tie: dropped and counted).
5. DPO: online.steps_per_round optimizer steps of config.batch_size pairs from this round's pairs, or with
   online.keep_pairs from every round's so far (`round_batch`), against the frozen pi_ref (where the stage
   started). Every loss of config.loss, LoRA, gradient accumulation and the mesh's axes apply as in stage 'dpo'.

n = 2 and one step per round is online DPO (Guo et al. 2024, "Direct language model alignment from online AI
feedback"; TRL's OnlineDPOTrainer, which also labels each pair by a reward model). n = 8, many steps per round and
pairs kept is iterative DPO (Dong, Xiong et al. 2024, "RLHF Workflow": best against worst of n, pi_ref fixed).

Resume with no lost work: each round's pairs and judge metrics are written to <workdir>/online_dpo/rounds/ before
its first DPO step (`save_round`), and the train state is checkpointed every checkpoint_every_steps steps and at
the end, its meta holding the round. A restarted run (after SIGTERM, a crash or kill -9) restores the newest
checkpoint; mid-round it reads that round's pairs back, and at a round boundary it samples the round again from
the restored policy with the round's key, which draws the same samples. The sampler's RNG state is therefore
(seed, round), both checkpointed. Either way the run reaches the summary an uninterrupted run reaches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dpo_jax import evaluate, lora as lora_lib, losses, rollout as rollout_lib, sample, sharding as sharding_lib, step
from dpo_jax.data import preference
from dpo_jax.train import checkpoint, judges as judges_lib, loop, metrics as metrics_lib, runtime

STAGE = "online_dpo"


# ---- the pure pieces ----

def max_new_tokens(config: Any) -> int:
  """online.max_new_tokens, or (0) the room a training row leaves after the longest prompt."""
  return config.online.max_new_tokens or config.max_length - config.max_prompt_length


def check_config(config: Any, data_parallel: int) -> None:
  """Errors naming the config.online field (and the fields online DPO cannot use), before any compute."""
  o = config.online
  for field, low in (("rounds", 1), ("steps_per_round", 1), ("prompts_per_round", 1), ("judge_batch_size", 1)):
    if not o[field] >= low:
      raise ValueError(f"config.online.{field}={o[field]} must be >= {low}.")
  if o.samples_per_prompt < 2:
    raise ValueError(f"config.online.samples_per_prompt={o.samples_per_prompt}: a pair needs two responses; set >= 2 "
                     "(2 = online DPO, e.g. 8 = iterative DPO's best against worst).")
  if (o.prompts_per_round * o.samples_per_prompt) % data_parallel or o.prompts_per_round % data_parallel:
    raise ValueError(f"config.online.prompts_per_round={o.prompts_per_round} must divide by the data-parallel size "
                     f"{data_parallel} (the round's prompts and samples are split over those devices).")
  if o.tie_margin < 0:
    raise ValueError(f"config.online.tie_margin={o.tie_margin} must be >= 0 (0: only exact ties are dropped).")
  new = max_new_tokens(config)
  if o.max_new_tokens < 0 or new < 1 or config.max_prompt_length + new > config.max_length:
    raise ValueError(f"config.online.max_new_tokens={o.max_new_tokens}: max_prompt_length ({config.max_prompt_length}) "
                     f"+ the samples' length must fit config.max_length={config.max_length}, the training row; set it "
                     f"<= {config.max_length - config.max_prompt_length} (0 = exactly that).")
  sample.check_sampling(o.temperature, o.top_k, o.top_p)
  if o.temperature <= 0:
    raise ValueError(f"config.online.temperature={o.temperature}: greedy samples of one prompt are identical, so every "
                     "pair would be a tie; sample at a temperature > 0 (1.0 = the policy itself).")
  judges_lib.check_config(o)
  refused = {"data.packing": config.data.get("packing", False), "data.reference_logps": config.data.reference_logps,
             "ref_update.mode": config.ref_update.mode != "off" if "ref_update" in config else False}
  for field, on in refused.items():
    if on:
      raise ValueError(f"config.{field} does not apply to stage 'online_dpo' (its pairs are sampled each round and "
                       f"pi_ref stays where the stage started); unset it.")


def round_prompts(num_prompts: int, per_round: int, seed: int, round_num: int) -> np.ndarray:
  """`[per_round]` indices of round `round_num`'s prompts: positions round * per_round ... of the stream of passes
  over the prompts, pass e in `preference.epoch_order(num_prompts, seed, e)` (every prompt once per pass)."""
  positions = round_num * per_round + np.arange(per_round)
  passes = positions // num_prompts
  out = np.empty(per_round, np.int64)
  for e in np.unique(passes):
    out[passes == e] = preference.epoch_order(num_prompts, seed, int(e))[positions[passes == e] % num_prompts]
  return out


def best_vs_worst(scores_PxN: np.ndarray, tie_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(chosen `[P]`, rejected `[P]`, kept `[P]` bool): per prompt the index of its highest-scored response against
  its lowest (first of equals); kept is False where max - min <= tie_margin (a tie: no preference to learn)."""
  scores_PxN = np.asarray(scores_PxN, np.float64)
  chosen, rejected = scores_PxN.argmax(axis=1), scores_PxN.argmin(axis=1)
  gap = scores_PxN.max(axis=1) - scores_PxN.min(axis=1)
  return chosen, rejected, (gap > tie_margin) & (chosen != rejected)


def round_batch(pool_size: int, batch_size: int, seed: int, round_num: int, step_in_round: int) -> np.ndarray:
  """`[batch_size]` pair indices (-1 = a padding pair) of DPO step `step_in_round` of a round over `pool_size` pairs.

  A pool of at least batch_size pairs: step s is batch s % n of pass s // n over it (n full batches per pass, each
  pass shuffled; `preference.iterate_batches`' order). A smaller pool (ties dropped): every pair once per step,
  shuffled, then padding pairs, which count for nothing in the loss."""
  key = seed * 1_000_003 + round_num  # one pair order per (seed, round)
  if pool_size < batch_size:
    order = preference.epoch_order(pool_size, key, step_in_round)
    return np.concatenate([order, -np.ones(batch_size - pool_size, np.int64)])
  n = preference.num_batches_per_epoch(pool_size, batch_size)
  order = preference.epoch_order(pool_size, key, step_in_round // n)
  start = (step_in_round % n) * batch_size
  return order[start:start + batch_size]


@dataclasses.dataclass
class Round:
  """One round's pairs (token ids) and its judge metrics; what `save_round` writes."""
  prompt_index: np.ndarray  # [K] index of each pair's prompt in the stage's prompt list
  chosen: list  # K int32 arrays: the best response (through its EOS, if it has one)
  rejected: list  # K int32 arrays: the worst
  metrics: dict  # online/* of the round (floats)


def pairs_of(rounds: Sequence[Round], prompts: Sequence[tuple[str, np.ndarray]], *, max_length: int, pad_id: int,
             eos_id: int, widths: tuple[int, int], first_row: int = 0) -> preference.TokenizedPairs | None:
  """The pairs of `rounds` as TokenizedPairs (fixed shared-prompt widths: one compiled step), None if empty."""
  idx = np.concatenate([r.prompt_index for r in rounds]) if rounds else np.zeros(0, np.int64)
  if not idx.size:
    return None
  return preference.TokenizedPairs(
      prompt_ids=tuple(prompts[int(i)][1] for i in idx), chosen_ids=tuple(c for r in rounds for c in r.chosen),
      rejected_ids=tuple(c for r in rounds for c in r.rejected),
      row_ids=np.arange(first_row, first_row + idx.size, dtype=np.int32), max_length=max_length, pad_id=pad_id,
      eos_id=eos_id, widths=widths)


def make_round(ro_tokens: np.ndarray, ro_mask: np.ndarray, scores_PxN: np.ndarray, prompt_index: np.ndarray,
               tie_margin: float, extra: dict) -> Round:
  """A round from its samples (`[P n, N]` tokens and response masks, prompt-major) and their scores `[P, n]`."""
  p, n = scores_PxN.shape
  chosen, rejected, kept = best_vs_worst(scores_PxN, tie_margin)
  lengths = ro_mask.sum(axis=1).astype(np.int64)
  response = lambda i, j: ro_tokens[i * n + j, :lengths[i * n + j]].astype(np.int32)
  keep = np.flatnonzero(kept)
  gap = scores_PxN[keep, chosen[keep]] - scores_PxN[keep, rejected[keep]]
  metrics = {"online/score": float(scores_PxN.mean()), "online/score_std": float(scores_PxN.std()),
             "online/score_gap": float(gap.mean()) if keep.size else 0.0, "online/pairs": float(keep.size),
             "online/tie_frac": float(1.0 - keep.size / p), "online/prompts": float(p), "online/samples": float(p * n),
             "online/length": float(lengths.mean()), **extra}
  if keep.size:  # a round of ties has no pairs to average (and TensorBoard refuses NaN)
    metrics.update({"online/chosen_score": float(scores_PxN[keep, chosen[keep]].mean()),
                    "online/rejected_score": float(scores_PxN[keep, rejected[keep]].mean())})
  return Round(prompt_index[keep], [response(i, chosen[i]) for i in keep], [response(i, rejected[i]) for i in keep],
               metrics)


# ---- round files: <workdir>/online_dpo/rounds/round_<r>.npz ----

def round_path(directory: str, round_num: int) -> str:
  return os.path.join(directory, f"round_{round_num:06d}.npz")


def save_round(directory: str, round_num: int, rnd: Round) -> None:
  """Atomically (a temporary file, then a rename): a kill mid-write leaves no half round under the final name."""
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  ragged = lambda seqs: (np.concatenate(seqs) if seqs else np.zeros(0, np.int32), np.array([len(s) for s in seqs],
                                                                                            np.int64))
  (c_flat, c_len), (r_flat, r_len) = ragged(rnd.chosen), ragged(rnd.rejected)
  tmp = round_path(directory, round_num) + ".tmp.npz"
  np.savez(tmp, prompt_index=rnd.prompt_index, chosen=c_flat, chosen_len=c_len, rejected=r_flat, rejected_len=r_len,
           metrics=np.array(json.dumps(rnd.metrics)))
  os.replace(tmp, round_path(directory, round_num))


def load_round(directory: str, round_num: int) -> Round | None:
  path = round_path(directory, round_num)
  if not os.path.isfile(path):
    return None
  with np.load(path) as f:
    split = lambda flat, lens: np.split(flat, np.cumsum(lens)[:-1]) if lens.size else []
    return Round(f["prompt_index"], split(f["chosen"], f["chosen_len"]), split(f["rejected"], f["rejected_len"]),
                 json.loads(str(f["metrics"])))


# ---- the stage ----

@dataclasses.dataclass
class Policy:
  """What the loop trains: full params, or LoRA adapters over the frozen base (= pi_ref)."""
  spec: lora_lib.LoraSpec | None
  base: Any  # the frozen base (LoRA) or None

  def of(self, state: step.TrainState) -> Any:
    return state.params if self.spec is None else lora_lib.LoraParams(self.base, state.params, self.spec)


def rollout_fn(rt: runtime.Runtime, tokenizer: Any) -> Callable:
  """The run's jitted, sharded sampler-and-scorer `fn(policy, reference, ids, mask, rng) -> Rollout`."""
  config = rt.config
  o = config.online
  pad_id, eos_id = preference.special_ids(tokenizer)
  shardings = step.param_shardings(rt.model_cfg, rt.mesh, rt.rules)
  # With a sequence axis the scoring model would split [B, P + N] rows over it: the rollout's short rows need none.
  model = rt.plain_model if rt.mesh.shape.get("sequence", 1) > 1 else rt.model
  new = max_new_tokens(config)
  return rt.jitted(f"online_rollout_{new}_{o.temperature}_{o.top_k}_{o.top_p}", lambda: rollout_lib.jit_rollout(
      rt.model_cfg, model, mesh=rt.mesh, rules=rt.rules, param_shardings=shardings, reference_shardings=shardings,
      max_new_tokens=new, eos_id=eos_id, pad_id=pad_id, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p))


def sample_round(rt: runtime.Runtime, policy_params: Any, reference: Any, prompts: Sequence[tuple[str, np.ndarray]],
                 judge: judges_lib.Judge, tokenizer: Any, round_num: int) -> Round:
  """Steps 1-4 of the module docstring for round `round_num`; seconds spent in each go into the metrics."""
  config = rt.config
  o = config.online
  n = o.samples_per_prompt
  pad_id, eos_id = preference.special_ids(tokenizer)
  index = round_prompts(len(prompts), o.prompts_per_round, config.seed + 5, round_num)
  ids, mask = evaluate.left_pad_prompts([prompts[int(i)][1] for i in index for _ in range(n)], pad_id)
  rows = sharding_lib.named_sharding(rt.mesh, rt.rules, ("batch", None))
  # Every host holds the whole round's prompts; each device takes its rows (also across hosts).
  on_mesh = lambda x: jax.make_array_from_callback(x.shape, rows, lambda index: x[index])
  start = time.perf_counter()
  ro = rollout_fn(rt, tokenizer)(policy_params, reference, on_mesh(ids), on_mesh(mask),
                                 jax.random.fold_in(jax.random.key(config.seed), 4000 + round_num))
  tokens, resp_mask = judges_lib.host_array(ro.response_ids), judges_lib.host_array(ro.response_mask)
  kl = judges_lib.host_array((ro.logps - ro.ref_logps).sum(axis=1))
  sampled = time.perf_counter()
  texts = [tokenizer.decode([t for t, m in zip(row, keep) if m and t != eos_id], skip_special_tokens=True)
           for row, keep in zip(tokens, resp_mask > 0)]
  scores = judge([prompts[int(i)][0] for i in index], [texts[k * n:(k + 1) * n] for k in range(len(index))], ro)
  judged = time.perf_counter()
  return make_round(tokens, resp_mask, scores, index, o.tie_margin,
                    {"online/kl": float(kl.mean()), "online/ended": float(judges_lib.host_array(ro.ended).mean()),
                     "perf/sample_seconds": sampled - start, "perf/judge_seconds": judged - sampled})


def summarize(metrics: Sequence[dict]) -> dict:
  """Totals over rounds' judge metrics: samples drawn, pairs kept, the tied fraction of prompts, seconds spent."""
  total = lambda k: float(sum(m.get(k, 0.0) for m in metrics))
  return {"rounds": len(metrics), "samples": int(total("online/samples")), "pairs": int(total("online/pairs")),
          "tie_frac": 1.0 - total("online/pairs") / max(total("online/prompts"), 1.0),
          "sample_seconds": total("perf/sample_seconds"), "judge_seconds": total("perf/judge_seconds"),
          "last_round": {k: v for k, v in metrics[-1].items() if not k.startswith("perf/")} if metrics else {}}


def run(rt: runtime.Runtime, start: Any, reference: Any, prompts: Sequence[tuple[str, np.ndarray]], tokenizer: Any,
        *, judge: judges_lib.Judge, eval_fn: Callable[[Any], dict] | None = None,
        measure: Callable[[int, Any], None] | None = None, workdir_state: bool = True,
        name: str = STAGE) -> tuple[Any, dict]:
  """Online / iterative DPO from pi_ref's params `start` (the policy's first params; with LoRA the frozen base) and
  the frozen `reference`. `prompts`: (text, token ids) of the distinct training prompts. `eval_fn(policy)`: the
  held-out metrics at eval.every_steps; `measure(step, policy)`: a callback after each step (the frontier's eval
  points). `workdir_state`: checkpoints and round files in <workdir>/online_dpo (the trainer), or none (the
  frontier). `name`: the stage name of its metrics records. Returns (the policy, the stage summary)."""
  config = rt.config
  o = config.online
  total_steps = o.rounds * o.steps_per_round
  pad_id, eos_id = preference.special_ids(tokenizer)
  widths = (config.max_prompt_length, max_new_tokens(config))
  directory = os.path.join(rt.workdir, STAGE)
  rounds_dir = os.path.join(directory, "rounds")
  mngr = checkpoint.manager(os.path.join(directory, "checkpoints"), max_to_keep=config.max_checkpoints) \
      if workdir_state else None

  # The step is compiled once, for batches shaped like any round's (fixed widths); an example from any prompt.
  dummy = pairs_of([Round(np.zeros(1, np.int64), [np.array([eos_id], np.int32)], [np.array([eos_id], np.int32)],
                          {})], prompts, max_length=config.max_length, pad_id=pad_id, eos_id=eos_id, widths=widths)
  kind = runtime.dpo_kind(config, dummy)
  example = preference.make_batch(dummy, np.zeros(config.batch_size, np.int64), kind=kind)
  example.pop("row_ids")
  uses_reference = losses.needs_reference(losses.from_config(config.loss)[0])  # SimPO, ORPO, ...: no pi_ref forward
  # One compile per step program: runs of one process (the frontier's methods at one beta) that differ only in
  # sampling, judging or pairing share it. The key holds everything the step is built from.
  lora_fields = config.lora.to_dict() if "lora" in config else {}
  step_key = json.dumps([config.loss.to_dict(), config.optim.to_dict(), total_steps, lora_fields, config.seed, kind,
                         {k: (v.shape, str(v.dtype)) for k, v in example.items()}], default=str, sort_keys=True)
  dpo_step, optimizer, shardings, spec = rt.jitted(f"online_dpo_step_{step_key}", lambda: runtime.dpo_train_step(
      rt, example, with_reference=uses_reference, stage=STAGE))
  policy = Policy(spec, start if spec is not None else None)
  first = runtime.initial_adapters(rt, spec, shardings.params) if spec is not None else start
  if mngr is not None:
    state = loop.start_state(rt, mngr, first, optimizer, shardings, donate=spec is not None, stage=STAGE)
  else:
    state = step.create_train_state(first, optimizer, shardings)
  frozen = start if spec is not None else reference if uses_reference else None
  merge = None
  if spec is not None:  # the sampler runs the merged weights W + (alpha / r) B A: one matmul per projection
    param_shardings = step.param_shardings(rt.model_cfg, rt.mesh, rt.rules)
    merge = rt.jitted("online_lora_merge", lambda: jax.jit(
        lambda base, adapters: lora_lib.merge(base, adapters, spec, rt.model_cfg), out_shardings=param_shardings))
  sampling_params = lambda s: s.params if spec is None else merge(start, s.params)

  done = int(jax.device_get(state.step))
  rt.writer.drop_after(name, done)
  block, blocks = rt.feed()
  host = preference.host_pairs(config.batch_size, block, blocks)
  bar = None
  if config.progress_bar and jax.process_index() == 0 and done < total_steps and workdir_state:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=done, desc=STAGE, dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
  say = (bar.write if bar is not None else (lambda line: print(line, flush=True) if jax.process_index() == 0 else 0))
  earlier = [load_round(rounds_dir, k) for k in range(done // o.steps_per_round)] if workdir_state else []
  if any(r is None for r in earlier):
    raise FileNotFoundError(f"{STAGE}: the checkpoint in {directory} is at step {done}, but round files of earlier "
                            f"rounds are missing from {rounds_dir}; restore them or start in a new --workdir.")
  kept = list(earlier) if o.keep_pairs else []
  round_metrics = [r.metrics for r in earlier]
  for round_num in range(done // o.steps_per_round, o.rounds):
    first_step = round_num * o.steps_per_round
    rnd = load_round(rounds_dir, round_num) if workdir_state and done > first_step else None
    if rnd is None and done > first_step:  # resampling from a mid-round policy would train on other pairs
      raise FileNotFoundError(f"{STAGE}: the checkpoint in {directory} is at step {done}, inside round {round_num}, "
                              f"whose pairs file {round_path(rounds_dir, round_num)} is missing; restore it or start "
                              "in a new --workdir.")
    if rnd is None:
      rnd = sample_round(rt, sampling_params(state), reference, prompts, judge, tokenizer, round_num)
      if workdir_state:
        save_round(rounds_dir, round_num, rnd)
    pool_rounds = kept + [rnd] if o.keep_pairs else [rnd]
    pool = pairs_of(pool_rounds, prompts, max_length=config.max_length, pad_id=pad_id, eos_id=eos_id, widths=widths)
    t0 = time.perf_counter()
    for j in range(done - first_step, o.steps_per_round):
      values = {}
      if pool is None:  # every prompt tied: nothing to learn this round, the step count still advances
        state = state._replace(step=state.step + 1)
      else:
        idx = round_batch(pool.num_pairs, config.batch_size, config.seed + 6, round_num, j)[host]
        local = preference.make_batch(pool, idx, kind=kind)
        local.pop("row_ids")
        state, m = dpo_step(state, frozen, rt.to_global(local))
        if done + 1 == total_steps or j + 1 == o.steps_per_round or (done + 1) % config.log_every_steps == 0:
          values = metrics_lib.to_python(m)  # waits for this step only where it is logged
          if not np.isfinite(values["loss"]):
            raise FloatingPointError(f"{STAGE}: loss is {values['loss']} at step {done + 1} (round {round_num}); the "
                                     "last good checkpoint is kept. Lower the learning rate.")
      done = first_step + j + 1
      round_end = j + 1 == o.steps_per_round
      if round_end:  # the round's judge metrics ride on its last step's record
        values.update(rnd.metrics, **{"online/round": float(round_num), "online/pool_pairs": float(
            pool.num_pairs if pool is not None else 0), "perf/train_seconds": time.perf_counter() - t0})
      if values:
        rt.writer.write(done, values, stage=name)
      if bar is not None:
        bar.update(1)
        if round_end:
          bar.set_postfix({"round": round_num + 1, "score": f"{values['online/score']:.3f}",
                           "loss": f"{values.get('loss', float('nan')):.4f}"}, refresh=False)
      if round_end and ((round_num + 1) % max(1, config.log_every_steps // o.steps_per_round) == 0
                        or round_num + 1 == o.rounds):
        say(metrics_lib.format_line(f"{name} round {round_num + 1}/{o.rounds}", done, values,
                                    ("online/score", "online/score_gap", "online/tie_frac", "online/kl",
                                     "online/length", "loss", "rewards/accuracies")))
      if measure is not None:
        measure(done, policy.of(state))
      if mngr is not None and done % config.checkpoint_every_steps == 0 and done < total_steps:
        checkpoint.save(mngr, done, state, _meta(config, done, round_num))
      if mngr is not None and loop.preemption_requested(done):
        if mngr.latest_step() != done:
          checkpoint.save(mngr, done, state, _meta(config, done, round_num))
        if bar is not None:
          bar.close()
        raise loop.Preempted(STAGE, done, str(mngr.directory))
      if eval_fn is not None and config.eval.every_steps and done % config.eval.every_steps == 0 and done < total_steps:
        held_out = eval_fn(policy.of(state))
        rt.writer.write(done, held_out, stage=name, split="test")
        say(metrics_lib.format_line(f"{name} held-out", done, metrics_lib.to_python(held_out),
                                    ("loss", "rewards/accuracies", "rewards/margins")))
    round_metrics.append(rnd.metrics)
    if o.keep_pairs:
      kept.append(rnd)
  if bar is not None:
    bar.close()
  if mngr is not None and mngr.latest_step() != done:
    checkpoint.save(mngr, done, state, _meta(config, done, o.rounds - 1))
  summary = summarize(round_metrics)
  summary["steps"] = done
  return policy.of(state), summary


def _meta(config: Any, done: int, round_num: int) -> dict:
  return {**loop.checkpoint_meta(config, STAGE, done, config.seed), "round": round_num}
