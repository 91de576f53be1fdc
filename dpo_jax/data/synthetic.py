"""The embedded synthetic preference task: short reviews whose ground-truth reward is computed by code.

A tiny stand-in for the DPO paper's controlled sentiment generation (IMDb prefixes, reward = a sentiment
classifier), small enough to train on a laptop CPU:

  prompt x    a review opening for one of 40 subjects in 5 domains, e.g. "my review of the sushi bar :"
  response y  6-16 tokens of a word-level language, e.g. "the food was superb but the service was dull ."
  r*(x, y)    REWARD_SCALE * sum over words of a graded sentiment lexicon (strong +-1.5..2.5 units,
              mild and verbs +-0.5..1.25, every other word 0)

The base distribution (what pi_ref should learn by SFT) writes one to three clauses about the domain's
aspects with a per-response mood, so most responses are mixed or neutral. Each preference pair is two base
responses to the same prompt, labelled by sampling the Bradley-Terry model (seed eq. 1):

    p(y1 > y2 | x) = sigmoid(r*(x, y1) - r*(x, y2))

so labels are noisy like human ones. REWARD_SCALE sets the noise: the Bayes-optimal label accuracy
E[sigmoid(|r*(x, y1) - r*(x, y2)|)] over base pairs is about 0.88 (printed by scripts/make_synthetic_data.py),
which caps the held-out preference accuracy any learned reward can reach.

Every word is lower case and punctuation is its own space-separated token, so a text is exactly its
tokens joined by single spaces and the word-level tokenizer decodes back to the same string.

Regenerate the files in DATA_DIR with `python scripts/make_synthetic_data.py --seed 0`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "synthetic"
TOKENIZER_DIR = DATA_DIR / "tokenizer"

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 in this order

# Sentiment words, strongest first within each group.
STRONG_POSITIVE = ("excellent", "wonderful", "superb", "brilliant", "outstanding", "fantastic", "stunning",
                   "perfect", "magnificent", "delightful")
MILD_POSITIVE = ("good", "nice", "pleasant", "enjoyable", "solid", "charming", "lovely", "fun", "clever", "warm")
STRONG_NEGATIVE = ("awful", "terrible", "dreadful", "horrible", "atrocious", "abysmal", "appalling", "disastrous",
                   "miserable", "unbearable")
MILD_NEGATIVE = ("bad", "dull", "weak", "boring", "bland", "tedious", "messy", "poor", "clumsy", "sloppy")
POSITIVE_VERBS = ("loved", "enjoyed", "liked", "admired")
NEGATIVE_VERBS = ("hated", "disliked", "regretted", "resented")
NEUTRAL_ADJECTIVES = ("average", "ordinary", "typical", "long", "short", "simple", "modern", "classic", "quiet",
                      "loud", "familiar", "different", "standard", "busy", "unusual", "large", "small", "old",
                      "new", "serious")
NEUTRAL_VERBS = ("noticed", "remember", "saw", "expected", "tried", "compared")
ADVERBS = ("very", "really", "quite", "rather", "somewhat", "fairly", "truly", "mostly", "slightly", "so")


def _graded(words: Sequence[str], high: float, low: float, sign: float) -> dict[str, float]:
  """Weights spread evenly from `high` (first word) to `low` (last): graded strengths make ties rare."""
  return {w: sign * float(v) for w, v in zip(words, np.linspace(high, low, len(words)))}


# Lexicon units per word (unlisted words: 0). r* = REWARD_SCALE * (sum of units over the response's words).
LEXICON: dict[str, float] = {
    **_graded(STRONG_POSITIVE, 2.5, 1.5, +1), **_graded(MILD_POSITIVE, 1.25, 0.5, +1),
    **_graded(POSITIVE_VERBS, 1.25, 0.75, +1),
    **_graded(STRONG_NEGATIVE, 2.5, 1.5, -1), **_graded(MILD_NEGATIVE, 1.25, 0.5, -1),
    **_graded(NEGATIVE_VERBS, 1.25, 0.75, -1),
}
# The Bradley-Terry temperature: with the base generator below it puts the Bayes-optimal label accuracy at
# ~0.88 (labels noisy like human ones, yet a learned reward can reach >= 0.75 held-out accuracy).
REWARD_SCALE = 1.75

# domain -> (prompt subjects, aspects a response talks about)
DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "film": (("the film", "this movie", "the sequel", "the documentary", "the new thriller", "the comedy",
              "the western", "the cartoon"),
             ("acting", "plot", "script", "soundtrack", "ending", "cast", "pacing", "dialogue", "visuals",
              "director")),
    "book": (("the novel", "this book", "the memoir", "the biography", "the poetry collection",
              "the mystery novel", "the cookbook", "the short stories"),
             ("prose", "characters", "plot", "chapters", "ending", "author", "style", "pacing", "dialogue",
              "cover")),
    "restaurant": (("the restaurant", "this cafe", "the bistro", "the pizza place", "the diner", "the sushi bar",
                    "the bakery", "the steakhouse"),
                   ("food", "service", "menu", "staff", "dessert", "prices", "portions", "coffee", "waiter",
                    "decor")),
    "hotel": (("the hotel", "this resort", "the inn", "the hostel", "the motel", "the lodge", "the guesthouse",
               "the beach hotel"),
              ("room", "bed", "staff", "breakfast", "pool", "view", "location", "lobby", "shower", "wifi")),
    "game": (("the game", "this video game", "the board game", "the puzzle game", "the racing game",
              "the strategy game", "the card game", "the platformer"),
             ("graphics", "controls", "story", "levels", "music", "multiplayer", "difficulty", "gameplay",
              "puzzles", "characters")),
}

PROMPT_TEMPLATES = ("review of {s} :", "my review of {s} :", "here is what i think of {s} :", "thoughts on {s} :",
                    "a short review of {s} :", "my honest opinion of {s} :", "what i thought of {s} :",
                    "{s} , reviewed :")

# Clause templates: A = aspect, J = adjective slot, V = verb slot, D = optional adverb.
CLAUSES = ("the A was J", "the A was D J", "i V the A", "J A", "overall it felt J", "the A and the A were J",
           "it was D J")
CONNECTORS = (",", "and", "but", ".")
MIN_RESPONSE_TOKENS, MAX_RESPONSE_TOKENS = 6, 16  # a response's tokens, punctuation included, EOS excluded

# Base-distribution knobs: P(a sentiment slot is neutral); P(a polar word is strong); Beta(a, a) mood.
P_NEUTRAL, P_STRONG, MOOD_CONCENTRATION = 0.35, 0.35, 1.5

_WORD = re.compile(r"[a-z]+")


# ----------------------------------------------------------------------------------------------- reward

def reward(prompt: str, response: str) -> float:
  """Ground-truth r*(x, y) in reward units (the scale of the Bradley-Terry logit).

  Scores only the response's sentiment (like the DPO paper's sentiment classifier): every prompt asks for
  a review, so the prompt is accepted for the r*(x, y) interface but does not change the score. Any string
  works: case and punctuation are ignored, unknown words and special tokens (e.g. "<eos>") score 0, and the
  empty string scores 0.0.
  """
  if not isinstance(prompt, str) or not isinstance(response, str):
    raise TypeError(f"reward(prompt, response) takes two str, got {type(prompt).__name__} and "
                    f"{type(response).__name__}; decode token ids first (tokenizer.decode(ids)).")
  return REWARD_SCALE * float(sum(LEXICON.get(w, 0.0) for w in _WORD.findall(response.lower())))


def rewards(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """r*(x_i, y_i) for paired sequences -> float64 `[N]`."""
  if len(prompts) != len(responses):
    raise ValueError(f"rewards: {len(prompts)} prompts but {len(responses)} responses; pass one prompt per "
                     "response (repeat a prompt for several samples).")
  return np.array([reward(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)


def bayes_accuracy(reward_diff: np.ndarray) -> float:
  """Expected fraction of Bradley-Terry labels agreeing with sign(r*(y1) - r*(y2)), ties counting 1/2.

  `reward_diff`: `[N]` r*(x, y1) - r*(x, y2). A sampled label agrees with the sign with probability
  sigmoid(|diff|), so this is also the best preference accuracy any reward model can expect on such labels.
  """
  d = np.abs(np.asarray(reward_diff, dtype=np.float64))
  return float(np.mean(1.0 / (1.0 + np.exp(-d))))


# ------------------------------------------------------------------------------------------- the language

def all_prompts() -> list[str]:
  """Every prompt of the task, in a fixed order (templates x subjects: 8 x 40 = 320)."""
  return [t.format(s=s) for subjects, _ in DOMAINS.values() for s in subjects for t in PROMPT_TEMPLATES]


def prompt_domain(prompt: str) -> str | None:
  """The domain whose subject the prompt names (longest match wins), or None for a foreign prompt."""
  best, best_len = None, 0
  padded = f" {prompt.lower()} "
  for domain, (subjects, _) in DOMAINS.items():
    for s in subjects:
      if f" {s} " in padded and len(s) > best_len:
        best, best_len = domain, len(s)
  return best


def vocabulary() -> list[str]:
  """Every word and punctuation token the task uses (prompts and responses), sorted; no special tokens."""
  texts = list(all_prompts()) + list(CLAUSES) + list(CONNECTORS)
  words = {w for t in texts for w in t.split()} - {"A", "J", "V", "D"}
  for group in (STRONG_POSITIVE, MILD_POSITIVE, STRONG_NEGATIVE, MILD_NEGATIVE, POSITIVE_VERBS, NEGATIVE_VERBS,
                NEUTRAL_ADJECTIVES, NEUTRAL_VERBS, ADVERBS):
    words.update(group)
  for _, aspects in DOMAINS.values():
    words.update(aspects)
  return sorted(words)


def split_prompts(seed: int, num_test: int = 48) -> tuple[list[str], list[str]]:
  """Disjoint (train, test) prompt lists: `num_test` prompts held out at random, both in all_prompts order."""
  prompts = all_prompts()
  held = set(np.random.default_rng([seed, 0]).choice(len(prompts), size=num_test, replace=False).tolist())
  return ([p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held])


def _slot_word(rng: np.random.Generator, mood: float, positive_strong, positive_mild, negative_strong,
               negative_mild, neutral) -> str:
  """One sentiment slot: neutral w.p. P_NEUTRAL, else positive w.p. `mood`, strong w.p. P_STRONG."""
  if rng.random() < P_NEUTRAL:
    return str(rng.choice(neutral))
  strong = rng.random() < P_STRONG
  if rng.random() < mood:
    return str(rng.choice(positive_strong if strong else positive_mild))
  return str(rng.choice(negative_strong if strong else negative_mild))


def _clause(rng: np.random.Generator, template: str, aspects: Sequence[str], mood: float) -> list[str]:
  picked = list(rng.choice(aspects, size=2, replace=False))  # distinct aspects for "the A and the A"
  out = []
  for w in template.split():
    if w == "A":
      out.append(str(picked.pop()))
    elif w == "was" and out and out[-1].endswith("s"):  # plural aspects ("prices", "levels") agree
      out.append("were")
    elif w == "J":
      out.append(_slot_word(rng, mood, STRONG_POSITIVE, MILD_POSITIVE, STRONG_NEGATIVE, MILD_NEGATIVE,
                            NEUTRAL_ADJECTIVES))
    elif w == "V":
      # Verbs carry one unit either way, so "strong" and "mild" verbs are the same lists.
      out.append(_slot_word(rng, mood, POSITIVE_VERBS, POSITIVE_VERBS, NEGATIVE_VERBS, NEGATIVE_VERBS,
                            NEUTRAL_VERBS))
    elif w == "D":
      out.append(str(rng.choice(ADVERBS)))
    else:
      out.append(w)
  return out


def sample_response(rng: np.random.Generator, prompt: str) -> str:
  """One response from the base distribution: 1-3 clauses about the prompt's domain, ending in " .".

  A mood ~ Beta(1.5, 1.5) per response sets the chance each polar slot is positive, so responses range from
  glowing to scathing with most in between. Resampled until it has MIN..MAX_RESPONSE_TOKENS tokens.
  """
  domain = prompt_domain(prompt)
  aspects = DOMAINS[domain][1] if domain else tuple(a for _, asp in DOMAINS.values() for a in asp)
  while True:
    mood = float(rng.beta(MOOD_CONCENTRATION, MOOD_CONCENTRATION))
    tokens: list[str] = []
    for i in range(int(rng.integers(1, 4))):
      if i:
        tokens.append(str(rng.choice(CONNECTORS)))
      tokens += _clause(rng, str(rng.choice(CLAUSES)), aspects, mood)
    tokens.append(".")
    if MIN_RESPONSE_TOKENS <= len(tokens) <= MAX_RESPONSE_TOKENS:
      return " ".join(tokens)


def label_pair(rng: np.random.Generator, prompt: str, y1: str, y2: str) -> dict:
  """Bradley-Terry label: y1 is chosen with probability sigmoid(r*(x, y1) - r*(x, y2)) (seed eq. 1).

  Returns the public explicit-prompt schema plus the two rewards (rounded to 1e-4) for analysis:
  {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}.
  """
  r1, r2 = reward(prompt, y1), reward(prompt, y2)
  if rng.random() < 1.0 / (1.0 + np.exp(-(r1 - r2))):
    return dict(prompt=prompt, chosen=y1, rejected=y2, chosen_reward=round(r1, 4), rejected_reward=round(r2, 4))
  return dict(prompt=prompt, chosen=y2, rejected=y1, chosen_reward=round(r2, 4), rejected_reward=round(r1, 4))


def make_pairs(prompts: Sequence[str], num_pairs: int, seed: int) -> list[dict]:
  """`num_pairs` labelled pairs, prompts drawn uniformly from `prompts`; same arguments -> same pairs.

  The two responses of a pair are distinct strings (an identical pair carries no preference).
  """
  rng = np.random.default_rng([seed, 1])
  pairs = []
  for _ in range(num_pairs):
    prompt = str(prompts[int(rng.integers(len(prompts)))])
    y1 = sample_response(rng, prompt)
    y2 = sample_response(rng, prompt)
    while y2 == y1:
      y2 = sample_response(rng, prompt)
    pairs.append(label_pair(rng, prompt, y1, y2))
  return pairs


# ------------------------------------------------------------------------------------------ files on disk

def train_path() -> Path:
  """DATA_DIR/train.jsonl: training pairs (prompts disjoint from test.jsonl's)."""
  return DATA_DIR / "train.jsonl"


def test_path() -> Path:
  """DATA_DIR/test.jsonl: held-out pairs on held-out prompts."""
  return DATA_DIR / "test.jsonl"


def write_jsonl(rows: Iterable[dict], path: Path) -> None:
  """One compact JSON object a line, keys in insertion order, '\\n' line ends (byte-identical reruns)."""
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def build_tokenizer():
  """A word-level `PreTrainedTokenizerFast` over vocabulary(): ids 0, 1, 2 = <pad>, <eos>, <unk>, then words.

  The vocabulary is the whole language (not only the words a sample happened to use), so every word the
  task can produce has an id. Whitespace pre-tokenization splits punctuation off words, unknown words map to
  <unk>, and no special token is added automatically (the data pipeline appends EOS itself).
  """
  # transformers is heavy; only the tokenizer helpers need it, so reward() stays numpy-only.
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  # Registered as special so "<eos>" is matched whole before pre-tokenization and skipped by decode.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  # No cleanup: it would glue " ," to the previous word and break the decode round trip.
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                 clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, path: str | Path = TOKENIZER_DIR) -> None:
  """`save_pretrained` to `path`, recording the class as "PreTrainedTokenizerFast".

  transformers 5 writes its own class name ("TokenizersBackend"), which transformers 4 cannot resolve;
  both resolve "PreTrainedTokenizerFast", so the committed folder loads with either.
  """
  path = Path(path)
  tokenizer.save_pretrained(str(path))
  config_path = path / "tokenizer_config.json"
  config = json.loads(config_path.read_text(encoding="utf-8"))
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_tokenizer(path: str | Path = TOKENIZER_DIR):
  """The saved task tokenizer via `transformers.AutoTokenizer` (local files only, works offline)."""
  from transformers import AutoTokenizer

  path = Path(path)
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(f"{path}: no tokenizer.json; regenerate it with "
                            "`python scripts/make_synthetic_data.py --seed 0 --out dpo_jax/data/synthetic`.")
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
