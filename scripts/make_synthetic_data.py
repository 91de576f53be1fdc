"""Regenerate the embedded synthetic preference task: train/test pairs and the word-level tokenizer.

    python scripts/make_synthetic_data.py --seed 0 --out dpo_jax/data/synthetic

Deterministic: the same arguments write byte-identical files. Prints the Bayes-optimal label accuracy
(the best held-out preference accuracy a reward model can expect on these noisy labels).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything here is built locally
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402

from dpo_jax.data import synthetic  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seed", type=int, default=0, help="seed of the prompt split and of both pair sets")
  p.add_argument("--out", type=Path, default=synthetic.DATA_DIR, help="output folder")
  p.add_argument("--num-train", type=int, default=4000, help="training pairs")
  p.add_argument("--num-test", type=int, default=500, help="held-out pairs (on held-out prompts)")
  return p.parse_args(argv)


def summarize(name: str, pairs: list[dict]) -> str:
  diff = np.array([p["chosen_reward"] - p["rejected_reward"] for p in pairs])
  # A label agrees with r* when the chosen response has the higher reward; ties have no sign to agree with.
  untied = diff[diff != 0]
  prompts = len({p["prompt"] for p in pairs})
  return (f"{name}: {len(pairs)} pairs over {prompts} prompts, ties {np.mean(diff == 0):.3f}; Bayes-optimal "
          f"label accuracy {synthetic.bayes_accuracy(diff):.3f}; on untied pairs labels agree with sign(r* diff) "
          f"{np.mean(untied > 0):.3f} (Bradley-Terry expects {synthetic.bayes_accuracy(untied):.3f})")


def main(argv=None) -> None:
  args = parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  train_prompts, test_prompts = synthetic.split_prompts(args.seed)
  # Distinct seeds per split so the test pairs do not replay the train pairs' random stream.
  train = synthetic.make_pairs(train_prompts, args.num_train, seed=2 * args.seed)
  test = synthetic.make_pairs(test_prompts, args.num_test, seed=2 * args.seed + 1)
  synthetic.write_jsonl(train, args.out / "train.jsonl")
  synthetic.write_jsonl(test, args.out / "test.jsonl")

  tokenizer = synthetic.build_tokenizer()
  synthetic.save_tokenizer(tokenizer, args.out / "tokenizer")

  print(f"vocabulary: {len(synthetic.vocabulary())} words; tokenizer: {len(tokenizer)} ids "
        f"(pad={tokenizer.pad_token_id}, eos={tokenizer.eos_token_id}, unk={tokenizer.unk_token_id})")
  print(summarize("train", train))
  print(summarize("test", test))
  for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    print(f"  {path.relative_to(args.out)}  {path.stat().st_size} bytes  sha256:{digest}")


if __name__ == "__main__":
  main()
