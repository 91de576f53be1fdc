"""The reward-vs-KL frontier experiment end to end on its tiny variant, and its config checks."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from dpo_jax.train import reward_model
from dpo_jax.experiments import frontier
from tests.config_overrides import override
from paths import REPO_ROOT

ROOT = REPO_ROOT


def frontier_config(variant="tiny"):
  spec = importlib.util.spec_from_file_location("frontier_config", os.path.join(ROOT, "configs", "frontier.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("frontier"))
  config = frontier_config()
  config.progress_bar = False
  return workdir, config, frontier.run(config, workdir)


@pytest.mark.slow
def test_tiny_frontier_writes_every_method_to_csv_json_and_png(tiny_run):
  workdir, config, summary = tiny_run
  f = config.frontier
  rows = frontier.read_csv(os.path.join(workdir, "frontier.csv"))
  assert len(rows) == len(summary["points"])
  for row, point in zip(rows, summary["points"]):  # the CSV holds what was measured (6 significant digits)
    assert row["method"] == point["method"] and row["setting"] == point["setting"] and row["step"] == point["step"]
    np.testing.assert_allclose([row["reward"], row["kl"]], [point["reward"], point["kl"]], rtol=1e-5, atol=1e-9)
  by_method = {}
  for row in rows:
    by_method.setdefault(row["method"], []).append(row)
  assert set(by_method) == set(frontier.METHODS) - set(frontier.ONLINE_METHODS) | set(f.online_methods)

  (sft,) = by_method["SFT"]
  assert sft["kl"] == 0.0 and sft["num_samples"] == summary["samples_per_point"]
  dpo = {(r["setting"], r["step"]) for r in by_method["DPO"]}
  assert dpo == {(f"beta={b:g}", s) for b in f.betas for s in f.eval_steps}
  assert {(r["setting"], r["step"]) for r in by_method["Preferred-FT"]} == {("", s) for s in f.eval_steps}
  assert {r["setting"] for r in by_method["Unlikelihood"]} == {f"alpha={a:g}" for a in f.unlikelihood_alphas}
  for r in by_method["DPO"] + by_method["Preferred-FT"] + by_method["Unlikelihood"]:
    assert math.isfinite(r["reward"]) and math.isfinite(r["kl"]) and r["num_samples"] == summary["samples_per_point"]
  bon = sorted(by_method["Best-of-N"], key=lambda r: r["kl"])
  assert [r["setting"] for r in bon] == [f"N={n}" for n in f.best_of_n]
  for r, n in zip(bon, f.best_of_n):
    assert r["kl"] == pytest.approx(reward_model.best_of_n_kl(n), rel=1e-5)
    assert r["num_samples"] == summary["prompts"] * max(f.best_of_n) // n  # every disjoint group of n is a draw

  with open(os.path.join(workdir, "frontier.json")) as fh:
    saved = json.load(fh)
  assert 0.0 <= saved["reward_model"]["accuracy"] <= 1.0 and saved["reward_model"]["pairs"] > 0
  assert set(saved["seconds"]) >= {"sft", "dpo_sweep", "preferred_ft", "reward_model", "best_of_n_sampling"}
  r = config.rl
  for method in r.methods:  # every RL method at every KL coefficient, measured at rl.eval_steps like the others
    assert {(p["setting"], p["step"]) for p in by_method[method]} == {
        (f"kl={c:g}", s) for c in r.kl_coefs for s in r.eval_steps}, method
    assert all(p["num_samples"] == summary["samples_per_point"] for p in by_method[method])
    for c in r.kl_coefs:
      run = saved["rl"][f"{method} kl={c:g}"]
      # Step 1 samples pi_ref itself (KL exactly 0), so the adaptive controller lowers the coefficient by its
      # largest step, clip(0 / target - 1) = -0.2, before step 2 (the last, whose coefficient is logged).
      assert run["rollout/kl_coef"] == pytest.approx(c * (1 - 0.2 * r.rollout_batch_size / r.kl_horizon), rel=1e-5)
      assert math.isfinite(run["policy/approx_kl"])
      assert 0.0 <= run["policy/clip_frac"] <= 1.0 and run["policy/entropy"] > 0
      assert ("value/loss" in run) == method.startswith("PPO")
      assert f"rl_{method}_{c:g}" in saved["seconds"]
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:  # every RL update is logged
    records = [json.loads(line) for line in fh]
  for method in r.methods:
    mine = [x for x in records if x["stage"] == f"rl_{method}_kl={r.kl_coefs[0]:g}"]
    assert [x["step"] for x in mine] == list(range(1, r.steps + 1)) and "policy/approx_kl" in mine[0], method
  steps = config.optim.total_steps
  for method in f.online_methods:  # online / iterative DPO: every beta, measured at the DPO eval steps
    assert {(p["setting"], p["step"]) for p in by_method[method]} == {
        (f"beta={b:g}", s) for b in f.online_betas for s in f.eval_steps}, method
    for b in f.online_betas:
      run = saved["online"][f"{method} beta={b:g}"]
      iterative = method.startswith("Iterative")
      rounds, n = (f.iterative_rounds, f.iterative_samples) if iterative else (steps, 2)
      prompts = f.iterative_prompts_per_round if iterative else config.batch_size
      assert (run["rounds"], run["steps"], run["samples"]) == (rounds, steps, rounds * prompts * n), method
      assert 0 < run["pairs"] <= rounds * prompts and 0.0 <= run["tie_frac"] < 1.0
      mine = [x for x in records if x["stage"] == f"online_{method}_beta={b:g}" and "online/score" in x]
      assert [x["online/round"] for x in mine] == list(range(rounds)), method
      if iterative:  # pairs kept: the pool grows round by round
        assert [x["online/pool_pairs"] for x in mine] == sorted(x["online/pool_pairs"] for x in mine)
  with open(os.path.join(workdir, "frontier.png"), "rb") as fh:
    assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "| DPO | beta=0.1 |" in frontier.format_table(rows)


def test_plot_from_the_csv_alone(tmp_path):
  """The README's figure can be redrawn from a CSV without training (frontier.plot on read_csv rows)."""
  points = [{"method": "SFT", "setting": "", "step": 0, "reward": 1.0, "reward_stderr": 0.1, "kl": 0.0,
             "kl_stderr": 0.0, "length": 10.0, "num_samples": 8}]
  for beta, gain in (("beta=0.1", 3.0), ("beta=1", 1.0)):
    points += [dict(points[0], method="DPO", setting=beta, step=s, reward=1 + gain * s / 10, kl=s / 5) for s in (5, 10)]
  points += [dict(points[0], method="Best-of-N", setting=f"N={n}", kl=round(reward_model.best_of_n_kl(n), 4))
             for n in (1, 4)]  # 4 digits: the CSV keeps 6 significant ones
  frontier.write_csv(str(tmp_path / "f.csv"), points)
  assert frontier.read_csv(str(tmp_path / "f.csv")) == points
  frontier.plot(points, str(tmp_path / "f.png"))
  assert (tmp_path / "f.png").stat().st_size > 10_000


@pytest.mark.parametrize("overrides, match", [
    ({"data.train": "pairs.jsonl"}, "ground-truth reward"),
    ({"data.reward": "none"}, "ground-truth reward"),
    ({"frontier.eval_steps": (5, 50)}, "eval_steps"),
    ({"frontier.eval_steps": (10, 5)}, "eval_steps"),
    ({"frontier.betas": (0.1, 0.0)}, "betas"),
    ({"frontier.unlikelihood_alphas": (1.5,)}, "unlikelihood_alphas"),
    ({"frontier.best_of_n": (0, 2)}, "best_of_n"),
    ({"frontier.sft_data": "rejected"}, "sft_data"),
    ({"eval.num_prompts": 0}, "num_prompts"),
    ({"rl.top_k": 50}, "config.rl: top_k=50"),
    ({"rl.top_p": 0.9}, "config.rl: top_p=0.9"),
    ({"rl.temperature": 0.7}, "config.rl: temperature=0.7"),
    ({"rl.group_size": 1}, "config.rl.group_size=1"),
    ({"rl.rollout_batch_size": 30}, "rollout_batch_size=30"),
    ({"rl.methods": ("PPO", "DPO")}, "config.rl.methods"),
    ({"frontier.reward_model_steps": 0}, "reward_model_steps=0"),
    ({"rl.eval_steps": (1, 3)}, "config.rl.eval_steps"),
    ({"rl.kl_coefs": (-0.1,)}, "config.rl.kl_coefs"),
    ({"rl.score_norm": "z"}, "config.rl.score_norm"),
    ({"rl.value_init": "random"}, "config.rl.value_init"),
    ({"rl.kl_estimator": "k2"}, "config.rl.kl_estimator"),
    ({"frontier.online_methods": ("Online DPO", "Offline DPO")}, "config.frontier.online_methods"),
    ({"frontier.online_betas": (0.0,)}, "config.frontier.online_betas"),
    ({"frontier.iterative_rounds": 3}, "config.frontier.iterative_rounds=3"),
    ({"frontier.iterative_samples": 1}, "a pair needs two responses"),
    ({"frontier.reward_model_steps": 0, "rl.methods": ()}, "judged by the reward model"),
])
def test_bad_frontier_configs_are_refused_before_any_compute(overrides, match, tmp_path):
  config = override(frontier_config(), overrides)
  with pytest.raises(ValueError, match=match):
    frontier.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_both_responses_doubles_the_sft_rows():
  from dpo_jax.data import preference
  ids = lambda *xs: tuple(np.asarray(x, np.int32) for x in xs)
  pairs = preference.TokenizedPairs(ids([5], [6]), ids([7, 1], [8, 1]), ids([9, 1], [10, 1]),
                                    np.array([0, 1], np.int32), max_length=8, pad_id=0, eos_id=1)
  both = frontier.both_responses(pairs)
  assert both.num_pairs == 4 and [c.tolist() for c in both.chosen_ids] == [[7, 1], [8, 1], [9, 1], [10, 1]]
  assert [p.tolist() for p in both.prompt_ids] == [[5], [6], [5], [6]]


def test_pareto_front_keeps_only_undominated_points():
  pts = [{"kl": kl, "reward": r} for kl, r in [(0.0, 0.0), (1.0, 2.0), (1.5, 1.0), (2.0, 2.0), (3.0, 5.0), (2.5, 6.0)]]
  assert [(p["kl"], p["reward"]) for p in frontier.pareto_front(pts)] == [(0.0, 0.0), (1.0, 2.0), (2.5, 6.0)]


def test_command_line_overrides_are_checked_against_the_frontier_config():
  from dpo_jax.train import config_checks
  default = os.path.join(ROOT, "configs", "frontier.py")
  config_checks.check_override_flags(["--config.frontier.sft_data=chosen", "--config.optim.total_steps=5"], default)
  with pytest.raises(SystemExit, match="betas"):
    config_checks.check_override_flags(["--config.frontier.betaz=(0.1,)"], default)
  with pytest.raises(SystemExit, match="frontier"):  # the trainer's own config has no frontier block
    config_checks.check_override_flags(["--config.frontier.sft_data=chosen"])


def test_merging_two_runs_needs_identical_shared_rows():
  spec = importlib.util.spec_from_file_location("merge_frontier", os.path.join(ROOT, "scripts", "merge_frontier.py"))
  merge = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(merge)
  row = lambda m, s, step, r: {"method": m, "setting": s, "step": step, "reward": r, "reward_stderr": 0.1, "kl": 1.0,
                               "kl_stderr": 0.1, "length": 12.0, "num_samples": 8}
  base = [row("SFT", "", 0, 0.0), row("DPO", "beta=0.1", 10, 1.0), row("PPO", "kl=0.2", 5, 2.0)]
  add = [row("SFT", "", 0, 0.0), row("DPO", "beta=0.1", 10, 1.0), row("Online DPO", "beta=0.1", 10, 3.0)]
  assert [r["method"] for r in merge.merge(base, add)] == ["SFT", "DPO", "PPO", "Online DPO"]
  with pytest.raises(SystemExit, match="disagree on 1 of 2 shared rows"):
    merge.merge(base, [row("SFT", "", 0, 0.5)] + add[1:])
