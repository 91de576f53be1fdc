"""Rule-based judges for online DPO: `--config.online.judge=callable --config.online.judge_path=FILE:FUNCTION`.

    python -m dpo_jax.train --config.stage=online_dpo --config.online.judge=callable \\
        --config.online.judge_path=examples/rule_judges.py:sentence_format

A judge is any function `fn(prompts, completions) -> one number per completion` over flat lists of strings (prompt i
repeated once per sample, in order), TRL's reward-function signature. It must be deterministic: a resumed round is
judged again and must pair the same responses. Higher is better; only the order within one prompt's samples matters
(online DPO pairs each prompt's best against its worst), so the scale is free.
"""

import re

_NUMBER = re.compile(r"-?\d+")


def sentence_format(prompts, completions):
  """Format: 1.0 for an answer that starts with a capital letter and ends with '.', '!' or '?', else 0.0; minus
  0.01 per word past 40 (a well-formed but rambling answer loses to a short one)."""
  out = []
  for text in completions:
    text = text.strip()
    ok = bool(text) and text[0].isupper() and text[-1] in ".!?"
    out.append(float(ok) - 0.01 * max(0, len(text.split()) - 40))
  return out


def brevity(prompts, completions):
  """Length: minus the number of words (the shortest answer wins; a length-bias probe)."""
  return [-float(len(text.split())) for text in completions]


def sum_exact_match(prompts, completions):
  """Exact match on arithmetic: for a prompt holding 'A + B' (integers), 1.0 when the completion's first integer
  is A + B, else 0.0; prompts without a sum score 0.0 (a verifiable reward, as in RL from verifiable rewards)."""
  out = []
  for prompt, text in zip(prompts, completions):
    m = re.search(r"(-?\d+)\s*\+\s*(-?\d+)", prompt)
    first = _NUMBER.search(text)
    out.append(float(m is not None and first is not None and int(first.group()) == int(m[1]) + int(m[2])))
  return out
