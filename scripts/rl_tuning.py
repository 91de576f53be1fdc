"""The RL baselines' tuning sweep: learning rate x rollout batch for one method and KL coefficient.

    python scripts/rl_tuning.py --method PPO-GT --kl_coef 0.2 --lrs 3e-5,1e-4,3e-4 --batch_sizes 256 --steps 20

pi_ref (SFT) and the reward model are trained once as the frontier trains them (configs/frontier.py), then each
(learning rate, rollout batch) runs `config.rl` otherwise unchanged and is measured as every frontier point is (fresh
held-out samples, r*, sequence KL) at `--steps`. Prints one markdown row per run; docs/frontier.md keeps the table
that chose the frontier's rl.learning_rate and rl.rollout_batch_size.
"""

from __future__ import annotations

if __name__ == "__main__":  # before jax and numpy start threads (as the frontier's entry point)
  from dpo_jax.train import host_memory
  host_memory.configure_at_startup()

import argparse
import importlib.util
import os
import tempfile
import time

from dpo_jax.experiments import frontier, rlhf
from dpo_jax.train import pipeline, runtime


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="PPO-GT", choices=rlhf.METHODS)
  parser.add_argument("--kl_coef", type=float, default=0.2)
  parser.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="comma-separated peak learning rates")
  parser.add_argument("--batch_sizes", default="256", help="comma-separated rollout batch sizes (samples per step)")
  parser.add_argument("--steps", type=int, default=20, help="RL steps per run; each run is measured at the last")
  parser.add_argument("--config", default=os.path.join(runtime.CONFIG_DIR, "frontier.py"), help="file[:variant]")
  args = parser.parse_args(argv)

  path, _, variant = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("_rl_tuning_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  config.rl.update(methods=(args.method,), kl_coefs=(args.kl_coef,), steps=args.steps, eval_steps=(args.steps,),
                   warmup_steps=min(config.rl.warmup_steps, args.steps))
  workdir = tempfile.mkdtemp(prefix="rl_tuning_")
  tokenizer = runtime.load_tokenizer(config.data.tokenizer)
  train_pairs, test_pairs, _, _ = runtime.load_pairs(config, tokenizer)
  rt = runtime.build_runtime(config, workdir, len(tokenizer))
  exp = frontier.Experiment(rt, tokenizer, pipeline.unique_prompts(test_pairs, tokenizer)[:config.eval.num_prompts])
  sft_pairs = frontier.both_responses(train_pairs) if config.frontier.sft_data == "both" else train_pairs
  exp.reference = pipeline.run_sft(rt, runtime.initial_params(rt), sft_pairs, test_pairs)
  rm_params = frontier.train_reward_model(exp, train_pairs, test_pairs)[0] if args.method != "PPO-GT" or \
      config.rl.value_init == "reward_model" else None
  train_prompts = pipeline.unique_prompts(train_pairs, tokenizer)
  rows = []
  for batch_size in (int(b) for b in args.batch_sizes.split(",")):
    for lr in (float(x) for x in args.lrs.split(",")):
      config.rl.update(learning_rate=lr, rollout_batch_size=batch_size)
      kind = rlhf.ground_truth_scorer(tokenizer) if args.method == "PPO-GT" else rlhf.reward_model_scorer(
          rt.plain_model, rm_params)
      scorer = rlhf.calibrate(kind, exp, train_prompts, config.rl.score_norm)
      start = time.perf_counter()
      last = rlhf.run_method(exp, args.method, args.kl_coef, train_prompts, scorer, rm_params)
      point = exp.points[-1]
      rows.append(f"| {args.method} | {args.kl_coef:g} | {lr:g} | {batch_size} | {args.steps} | "
                  f"{point['reward']:.2f} +- {point['reward_stderr']:.2f} | {point['kl']:.2f} | "
                  f"{last['policy/approx_kl']:.4f} | {last['policy/clip_frac']:.3f} | "
                  f"{time.perf_counter() - start:.0f} |")
  print("\n| method | kl_coef | learning rate | rollout batch | steps | reward r* | KL (nats) | approx-KL | "
        "clip frac | seconds |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
  main()
