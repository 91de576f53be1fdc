"""Online and iterative DPO (dpo_jax/train/online.py), its judges (judges.py) and the reward-model stage."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax import model as model_lib, rl_step, rollout as rollout_lib
from dpo_jax.data import preference, synthetic
from dpo_jax.train import config_checks, judges, online, pipeline, reward_model, runtime
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices
from trainer_runs import read_metrics, tiny


# ---- pairing, prompts, batches ----

def test_best_vs_worst_pairs_the_extremes_and_drops_ties():
  scores = np.array([[0.1, 0.9, 0.5, -0.2],   # best 1, worst 3
                     [0.3, 0.3, 0.3, 0.3],    # all equal: a tie
                     [1.0, 1.0, 0.0, 1.0],    # best is the first of the equal maxima
                     [0.50, 0.52, 0.51, 0.50]])  # gap 0.02: a tie under tie_margin 0.05
  chosen, rejected, kept = online.best_vs_worst(scores)
  assert chosen.tolist()[:3] == [1, 0, 0] and rejected.tolist()[:3] == [3, 0, 2]
  assert kept.tolist() == [True, False, True, True]
  assert online.best_vs_worst(scores, tie_margin=0.05)[2].tolist() == [True, False, True, False]


def test_round_prompts_pass_over_every_prompt_once_per_pass():
  rounds = [online.round_prompts(10, 4, seed=3, round_num=r) for r in range(5)]
  stream = np.concatenate(rounds)  # 20 positions = 2 passes of 10
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:])  # each pass shuffled anew
  assert np.array_equal(online.round_prompts(10, 4, seed=3, round_num=2), rounds[2])  # a pure function


def test_round_batches_cover_the_pool_and_pad_a_small_one():
  small = online.round_batch(5, 8, seed=0, round_num=1, step_in_round=0)
  assert sorted(small[:5]) == list(range(5)) and (small[5:] == -1).all()
  big = [online.round_batch(20, 8, seed=0, round_num=1, step_in_round=j) for j in range(2)]
  assert len(set(np.concatenate(big).tolist())) == 16  # two full batches of one pass, no repeats
  assert not np.array_equal(online.round_batch(20, 8, 0, 2, 0), big[0])  # another round, another order


def _round():
  tokens = np.array([[5, 6, 2, 0], [7, 2, 0, 0], [8, 9, 9, 9], [4, 2, 0, 0]], np.int32)  # eos 2, 2 prompts x 2
  mask = rollout_lib.response_mask(tokens, 2)
  return online.make_round(tokens, np.asarray(mask), np.array([[0.2, 1.5], [0.0, 0.0]]), np.array([3, 7]), 0.0,
                           {"online/kl": 0.1})


def test_a_round_keeps_best_and_worst_tokens_through_eos_and_counts_ties():
  rnd = _round()
  assert rnd.prompt_index.tolist() == [3]  # prompt 7 tied
  assert rnd.chosen[0].tolist() == [7, 2] and rnd.rejected[0].tolist() == [5, 6, 2]
  assert rnd.metrics["online/tie_frac"] == 0.5 and rnd.metrics["online/pairs"] == 1.0
  assert rnd.metrics["online/score_gap"] == pytest.approx(1.3) and rnd.metrics["online/samples"] == 4.0


def test_round_files_round_trip(tmp_path):
  rnd = _round()
  online.save_round(str(tmp_path), 3, rnd)
  back = online.load_round(str(tmp_path), 3)
  assert back.prompt_index.tolist() == [3] and back.metrics == rnd.metrics
  assert [c.tolist() for c in back.chosen] == [[7, 2]] and [r.tolist() for r in back.rejected] == [[5, 6, 2]]
  empty = online.Round(np.zeros(0, np.int64), [], [], {"online/pairs": 0.0})
  online.save_round(str(tmp_path), 4, empty)
  assert online.load_round(str(tmp_path), 4).chosen == [] and online.load_round(str(tmp_path), 5) is None
  assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_pairs_of_rounds_have_fixed_widths():
  prompts = [(f"p{i}", np.arange(1, 2 + i % 3, dtype=np.int32)) for i in range(8)]
  pairs = online.pairs_of([_round()], prompts, max_length=32, pad_id=0, eos_id=2, widths=(12, 20))
  assert pairs.num_pairs == 1 and (pairs.prompt_width, pairs.response_width) == (12, 20)
  batch = preference.make_batch(pairs, np.array([0, -1]), kind=preference.SHARED)
  assert batch["prompt_ids"].shape == (2, 12) and batch["input_ids"].shape == (4, 20)
  assert batch["pair_mask"].tolist() == [1, 0]


# ---- judges ----

def test_synthetic_and_callable_judges(tmp_path):
  texts = (["write a review"] * 2, [["great wonderful film", "awful boring mess"], ["fine", "bad"]])
  scores = judges.synthetic_judge()(*texts)
  assert scores.shape == (2, 2) and scores[0, 0] > scores[0, 1]
  rule = tmp_path / "rules.py"
  rule.write_text("def length(prompts, completions):\n  return [float(len(c)) for c in completions]\n"
                  "def broken(prompts, completions):\n  return [float('nan')] * len(completions)\n")
  by_length = judges.callable_judge(f"{rule}:length")(*texts)
  assert by_length.tolist() == [[20.0, 17.0], [4.0, 3.0]]
  with pytest.raises(ValueError, match="score nan for response 0 of prompt 0"):
    judges.callable_judge(f"{rule}:broken")(*texts)
  with pytest.raises(ValueError, match="has no function 'nope'"):
    judges.load_callable(f"{rule}:nope")
  with pytest.raises(ValueError, match="module:function"):
    judges.load_callable("no_colon_here")


def _rt(tmp_path, **overrides):
  config = tiny(**{"mesh.data": -1, **overrides})
  tok = runtime.load_tokenizer("")
  return runtime.build_runtime(config, str(tmp_path), len(tok)), tok


def test_a_saved_reward_model_loads_onto_the_mesh_and_judges_tokens_and_text_alike(tmp_path):
  rt, tok = _rt(tmp_path)
  params = rl_step.scalar_head_model(model_lib.init_params(rt.model_cfg, jax.random.key(0)), rt.model_cfg.hidden_size)
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1), (rt.model_cfg.hidden_size,))
  reward_model.save(str(tmp_path / "rm"), params, rt.model_cfg, {"held_out": {"accuracy": 0.5}})
  cfg, loaded, meta = reward_model.load(str(tmp_path / "rm"), mesh=rt.mesh, rules=rt.rules)
  assert cfg == rt.model_cfg and meta["held_out"]["accuracy"] == 0.5
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, loaded))
  judge = judges.reward_model_judge(str(tmp_path / "rm"), rt, tok, batch_size=3)
  prompts = ["write a review of the movie", "your take on the film"]
  responses = [["a great film", "dull"], ["i loved it", "it was bad and long"]]
  rows = judges.tokens_of(tok, [p for p in prompts for _ in "ab"], [r for rs in responses for r in rs])
  ro = rollout_lib.Rollout(rows["input_ids"], rows["positions"], rows["attention_mask"], rows["response_mask"],
                           rows["response_mask"], rows["response_mask"], rows["ended"])
  from_text, from_tokens = judge(prompts, responses), judge(prompts, responses, ro)
  assert np.array_equal(from_text, from_tokens) and from_text.shape == (2, 2) and np.ptp(from_text) > 0
  with pytest.raises(FileNotFoundError, match="not a finished reward model folder"):
    reward_model.load(str(tmp_path))


# ---- config refusals: one per field ----

REFUSALS = [
    ({"online.rounds": 0}, "online.rounds=0 must be >= 1"),
    ({"online.steps_per_round": 0}, "online.steps_per_round=0 must be >= 1"),
    ({"online.prompts_per_round": 0}, "online.prompts_per_round=0 must be >= 1"),
    ({"online.judge_batch_size": 0}, "online.judge_batch_size=0 must be >= 1"),
    ({"online.samples_per_prompt": 1}, "a pair needs two responses"),
    ({"online.prompts_per_round": 6}, "prompts_per_round=6 must divide by the data-parallel size 8"),
    ({"online.tie_margin": -1.0}, "tie_margin=-1.0 must be >= 0"),
    ({"online.max_new_tokens": 40}, "max_new_tokens=40: max_prompt_length"),
    ({"online.temperature": 0.0}, "temperature=0.0: greedy samples of one prompt are identical"),
    ({"online.top_k": -1}, "top_k"),
    ({"online.top_p": 1.5}, "top_p"),
    ({"online.judge": "gpt"}, "online.judge='gpt'; choose one of"),
    ({"online.judge": "hf"}, "judge='hf' needs config.online.judge_path"),
    ({"online.judge": "callable"}, "judge='callable' needs config.online.judge_path"),
    ({"online.judge": "callable", "online.judge_path": "os:no_such_fn"}, "has no function 'no_such_fn'"),
    ({"online.judge_path": "x"}, "judge='synthetic' takes no judge_path"),
    ({"online.samples_per_prompt": 8, "online.keep_pairs": True}, None),  # iterative DPO's settings are fine
    ({"data.packing": True}, "data.packing does not apply to stage 'online_dpo'"),
    ({"data.reference_logps": True}, "reference_logps=True needs config.stage='dpo'"),
    ({"ref_update.mode": "soft"}, "ref_update.mode does not apply to stage 'online_dpo'"),
    ({"reward_model.steps": 0}, "reward_model.steps"),
    ({"reward_model.batch_size": 0}, "reward_model.batch_size"),
    ({"reward_model.learning_rate": 0.0}, "reward_model.learning_rate"),
    ({"reward_model.warmup_steps": -1}, "reward_model.warmup_steps"),
    ({"stage": "reward_model", "reward_model.batch_size": 6}, "reward_model.batch_size=6 is not divisible"),
]


@pytest.mark.parametrize("overrides,error", REFUSALS, ids=[next(iter(o)) + f"={next(iter(o.values()))}"
                                                           for o, _ in REFUSALS])
def test_each_bad_online_field_is_refused_by_name(overrides, error):
  config = tiny(**{"stage": "online_dpo", "online.prompts_per_round": 8, "batch_size": 8, **overrides})
  if error is None:
    config_checks.validate_config(config, 8)
    return
  with pytest.raises(ValueError, match=error.replace("(", r"\(").replace("+", r"\+")):
    config_checks.validate_config(config, 8)


# ---- end to end ----

@pytest.mark.slow
def test_reward_model_stage_then_iterative_lora_dpo_judged_by_it(tmp_path, capsys):
  """stage=reward_model saves r_phi; stage=online_dpo with it as the judge, LoRA, grad accumulation, kept pairs
  and a sequence axis (8 devices: data 4 x sequence 2)."""
  workdir = str(tmp_path)
  with open(synthetic.test_path()) as f, open(tmp_path / "test.jsonl", "w") as out:
    out.writelines(line for line, _ in zip(f, range(32)))  # a short held-out set: the evaluations are not the point
  base = {"sft.steps": 0, "mesh.sequence": 2, "eval.num_prompts": 8, "eval.every_steps": 3,
          "data.test": str(tmp_path / "test.jsonl")}
  rm = pipeline.run(tiny(**base, stage="reward_model"), workdir)
  assert os.path.isfile(os.path.join(workdir, "reward_model", reward_model.META_FILE))
  assert 0.0 <= rm["reward_model"]["held_out"]["accuracy"] <= 1.0
  summary = pipeline.run(tiny(**base, **{
      "stage": "online_dpo", "online.judge": "reward_model", "online.keep_pairs": True, "online.rounds": 3,
      "online.steps_per_round": 2, "online.samples_per_prompt": 3, "lora.rank": 4, "optim.grad_accum_steps": 2,
      "log_every_steps": 1}), workdir)
  out = capsys.readouterr().out
  assert "judge: reward model" in out and "online DPO: 3 rounds, 6 DPO steps, 72 samples" in out
  o = summary["online"]
  assert o["rounds"] == 3 and o["samples"] == 72 and 0 < o["pairs"] <= 24 and o["steps"] == 6
  assert np.isfinite(summary["pi_theta"]["kl"]) and 0 <= summary["pi_theta"]["accuracy"] <= 1
  rows = read_metrics(workdir, "online_dpo")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  ends = [r for r in rows if "online/score" in r]
  assert [r["online/round"] for r in ends] == [0.0, 1.0, 2.0]
  pools = [r["online/pool_pairs"] for r in ends]
  assert pools == sorted(pools) and pools[-1] == o["pairs"]  # keep_pairs: the pool grows by each round's pairs
  for key in ("online/kl", "online/length", "online/score_gap", "online/tie_frac", "loss", "rewards/accuracies",
              "perf/sample_seconds", "perf/judge_seconds", "perf/train_seconds"):
    assert np.isfinite(ends[-1][key]), key
  assert [r["step"] for r in read_metrics(workdir, "online_dpo", "test")] == [3, 6]


ARGS = ["--config", "configs/default.py:tiny", "--config.stage=online_dpo", "--config.sft.steps=0",
        "--config.online.rounds=4", "--config.online.steps_per_round=3", "--config.checkpoint_every_steps=2",
        "--config.eval.every_steps=0", "--config.progress_bar=False", "--config.log_every_steps=1"]


def _run(workdir, **env):
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "fault_trainer.py"), *ARGS, "--workdir",
                         str(workdir)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        env=without_emulated_devices(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu",
                                                     **env))


def _outcome(workdir):
  """What must not depend on interruptions: the summary (timings aside) and every metrics record (perf aside)."""
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  summary["online"] = {k: v for k, v in summary["online"].items() if "seconds" not in k}
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return summary, [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records
                   if r["stage"] == "online_dpo"]


@pytest.mark.slow
def test_kill_9_mid_round_and_at_a_round_boundary_resume_to_the_uninterrupted_summary(tmp_path):
  """Rounds of 3 steps, checkpoints every 2: killed after step 5 it resumes from step 4 (mid-round 1: that round's
  pairs are read back), killed again after step 7 from step 6 (round 2's start: sampled again, same key)."""
  full = _run(tmp_path / "full")
  assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
  killed = tmp_path / "killed"
  for kill_at, resumes_from in ((5, None), (7, 4)):
    out = _run(killed, DPO_JAX_TEST_KILL_AT_ONLINE_STEP=str(kill_at))
    assert out.returncode == -signal.SIGKILL, out.stdout[-3000:] + out.stderr[-3000:]
    if resumes_from is not None:
      assert f"resuming from step {resumes_from}" in out.stdout
  assert os.path.isfile(online.round_path(str(killed / "online_dpo" / "rounds"), 2))
  out = _run(killed)
  assert out.returncode == 0 and "resuming from step 6" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
  summary, records = _outcome(killed)
  expected_summary, expected_records = _outcome(tmp_path / "full")
  assert records == expected_records  # each step once, bit for bit (JSON keeps floats' shortest repr)
  assert {k: summary[k] for k in ("pi_ref", "pi_theta", "online")} == {
      k: expected_summary[k] for k in ("pi_ref", "pi_theta", "online")}
  assert summary["online"]["samples"] == 4 * 8 * 4  # rounds x prompts x n, each round counted once



def test_the_example_rule_judges_load_by_path_and_score():
  path = os.path.join(REPO_ROOT, "examples", "rule_judges.py")
  fmt = judges.callable_judge(f"{path}:sentence_format")
  assert fmt(["Q?"], [["Yes, it is.", "yes it is", " ".join(["Word"] * 50) + "."]]).tolist() == [[1.0, 0.0, 0.9]]
  exact = judges.callable_judge(f"{path}:sum_exact_match")
  assert exact(["What is 12 + 30?", "Hello"], [["42, surely", "It is 41"], ["42", "hi"]]).tolist() == [
      [1.0, 0.0], [0.0, 0.0]]
  assert judges.callable_judge(f"{path}:brevity")(["x"], [["a b c", "a"]]).tolist() == [[-3.0, -1.0]]
