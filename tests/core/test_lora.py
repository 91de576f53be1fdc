"""LoRA DPO (dpo_jax/lora.py): adapters on the policy, pi_ref the frozen base with them off.

At step 0 the policy is the base (loss exactly log 2); only adapters move; the same step as PEFT + torch; PEFT
folders both ways; every batch layout and loss variant; the same update on 8 devices as on 1; and the trainer."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_dpo_batch
from config_overrides import override
from configs.default import get_config
from dpo_jax import logprobs, lora, losses, model as model_lib, optim, step
from dpo_jax.train import config_checks, pipeline, runtime
from dpo_jax.train import checkpoint
from dpo_jax.interop import compare_torch, hf
from dpo_jax.interop.hf import peft as peft_io
from dpo_jax.data import packing, preference
from train_steps import run_steps

CONFIG = get_config("tiny")
CONFIG.optim.warmup_steps = 0
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
MODEL = model_lib.make_model(MODEL_CFG)
ALL = lora.LoraSpec(rank=4, alpha=8.0, targets=("all-linear",))


def perturbed(adapters, seed=1, scale=0.05):
  """Adapters as after some training (B != 0), so A gets gradients and the policy differs from the base."""
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
  return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


@pytest.fixture(scope="module")
def base():
  return model_lib.init_params(MODEL_CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def pairs():
  config = get_config("tiny")
  tokenizer = runtime.load_tokenizer("")
  tokenized, _, _, _ = runtime.load_pairs(config, tokenizer)
  return tokenized


def test_spec_checks_name_the_field():
  assert lora.spec_from_config(get_config().lora) is None  # rank 0: full fine-tuning
  assert ALL.targets == tuple(t for t in lora.TARGETS if t not in lora.EXPERT_TARGETS) and ALL.scale == 2.0
  assert lora.LoraSpec(4, 8.0, targets=("v_proj", "q_proj")).targets == ("q_proj", "v_proj")
  for kwargs, match in ((dict(targets=("qkv",)), "config.lora.targets"), (dict(rank=0), "config.lora.rank"),
                        (dict(alpha=0.0), "config.lora.alpha"), (dict(dropout=1.0), "config.lora.dropout")):
    with pytest.raises(ValueError, match=match):
      lora.LoraSpec(**{"rank": 4, "alpha": 8.0, **kwargs})


@pytest.mark.parametrize("init", ["peft", "gaussian"])
def test_fresh_adapters_start_as_peft_draws_them(init):
  spec = lora.LoraSpec(rank=8, alpha=16.0, targets=("all-linear",), init=init)
  adapters = lora.init_adapters(MODEL, spec, jax.random.key(0))
  gate = np.asarray(adapters["layers_0"]["mlp"]["gate_lora"]["a"])  # [in = 32, r]
  if init == "peft":  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert 0.9 / math.sqrt(32) < np.abs(gate).max() <= 1 / math.sqrt(32)
  else:  # normal_(std=1/r)
    assert gate.std() == pytest.approx(1 / 8, rel=0.2)
  for leaf in jax.tree.leaves(jax.tree.map(lambda d: d["b"], adapters, is_leaf=lambda d: "b" in d)):
    assert not np.asarray(leaf).any()


def test_adapters_shard_like_their_kernels():
  axes = lora.adapter_logical_axes(MODEL, ALL)["layers_0"]
  assert axes["attn"]["q_lora"] == {"a": ("embed", None), "b": (None, "heads", "head_dim")}
  assert axes["attn"]["o_lora"] == {"a": ("heads", "head_dim", None), "b": (None, "embed")}
  assert axes["mlp"]["down_lora"] == {"a": ("mlp", None), "b": (None, "embed")}
  shapes = lora.abstract_adapters(MODEL, lora.LoraSpec(rank=4, alpha=8.0))  # PEFT's default: q_proj, v_proj
  assert set(shapes["layers_0"]) == {"attn"} and set(shapes["layers_0"]["attn"]) == {"q_lora", "v_lora"}


def test_step_0_is_the_base_and_only_the_adapters_move(base):
  adapters = lora.init_adapters(MODEL, ALL, jax.random.key(3))
  assert all(float(jnp.abs(b).max()) == 0.0 for b in jax.tree.leaves(jax.tree.map(
      lambda d: d["b"], adapters, is_leaf=lambda d: isinstance(d, dict) and "b" in d)))
  batch = random_dpo_batch(0, 8, 24, MODEL_CFG.vocab_size)
  batch.pop("row_ids")
  policy = lora.LoraParams(base, adapters, ALL)
  ours = logprobs.sequence_logps(MODEL, policy, batch).logps
  np.testing.assert_array_equal(ours, logprobs.sequence_logps(MODEL, base, batch).logps)  # bit for bit

  before = jax.tree.map(np.array, base)
  new_adapters, history = run_steps(base, batch, model_cfg=MODEL_CFG, config=CONFIG, mesh_sizes={"data": 1},
                                    devices=1, steps=3, lora=ALL, adapters=adapters)
  assert history[0]["loss"] == np.float32(math.log(2.0))  # policy == pi_ref: every margin is exactly 0
  assert history[0]["rewards/margins"] == 0.0 and history[-1]["loss"] < history[0]["loss"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, base), before)  # the base never changes
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
           zip(jax.tree.leaves(new_adapters), jax.tree.leaves(adapters))]
  assert min(moved) > 0, moved  # every A and B moved (B from its first step, A once B != 0)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("all-linear",)])
@pytest.mark.slow
def test_a_dpo_step_matches_peft_and_torch(targets):
  import transformers
  from torch_models import random_hf_model
  torch_model = random_hf_model(transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=targets)
  cfg = hf.model_config_from_hf(torch_model.config)
  adapters = perturbed(lora.init_adapters(model_lib.make_model(cfg), spec, jax.random.key(0)))
  batch = random_dpo_batch(0, 4, 20, 96)
  batch.pop("row_ids")
  report = compare_torch.compare_lora(torch_model, adapters, spec, batch, beta=0.5, lr=1e-3, weight_decay=0.01)
  print(compare_torch.format_report(report))
  for quantity, (_, rel) in report.items():
    assert rel <= 1e-5, (quantity, report)


def test_peft_folders_both_ways_and_the_merge(tmp_path, base):
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM
  adapters = perturbed(lora.init_adapters(MODEL, ALL, jax.random.key(5)))
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  hf.save_hf_checkpoint(jax.device_get(base), MODEL_CFG, base_dir)
  peft_io.save_peft_adapter(adapter_dir, adapters, ALL, MODEL_CFG, base_model_name_or_path=base_dir)
  assert json.load(open(os.path.join(adapter_dir, "adapter_config.json")))["r"] == 4

  batch = random_dpo_batch(1, 3, 16, MODEL_CFG.vocab_size)
  ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
  attention = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
  peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                         adapter_dir).eval()
  with torch.no_grad():
    theirs = peft_model(input_ids=ids, attention_mask=attention).logits.numpy()
  ours = np.asarray(model_lib.apply_params(MODEL, lora.LoraParams(base, adapters, ALL), batch["input_ids"],
                                           batch["positions"], batch["attention_mask"]))
  real = batch["attention_mask"] > 0
  assert np.abs(ours[real] - theirs[real]).max() <= 1e-5 * np.abs(theirs[real]).max()

  # back in: the same adapters, bit for bit; a rank that does not match is refused naming the field
  spec, loaded = peft_io.load_peft_adapter(adapter_dir, MODEL, MODEL_CFG, expect=ALL)
  assert spec == ALL
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, adapters))
  with pytest.raises(ValueError, match="config.lora.rank"):
    peft_io.load_peft_adapter(adapter_dir, MODEL, MODEL_CFG, expect=lora.LoraSpec(8, 8.0, targets=("all-linear",)))

  # merged: W + (alpha / r) A B in our layout, and what PEFT's merge_and_unload writes
  merged = jax.device_get(lora.merge(base, adapters, ALL, MODEL_CFG))
  for module, proj in (("attn", "q"), ("attn", "o"), ("mlp", "down")):
    ad = adapters["layers_1"][module][f"{proj}_lora"]
    expected = np.asarray(base["layers_1"][module][proj]["kernel"]) + 2.0 * np.tensordot(ad["a"], ad["b"], axes=1)
    np.testing.assert_allclose(merged["layers_1"][module][proj]["kernel"], expected, rtol=1e-6, atol=1e-7)
  peft_merged = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
  for name, value in hf.hf_state_dict_from_params(merged, MODEL_CFG).items():
    np.testing.assert_allclose(value, peft_merged[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_precomputed_reference_logps_equal_the_base_forward(base):
  """With ref_*_logps in the batch (stage 'precompute'), a LoRA step skips pi_ref's forward and updates the same."""
  adapters = perturbed(lora.init_adapters(MODEL, ALL, jax.random.key(4)))
  batch = random_dpo_batch(2, 6, 24, MODEL_CFG.vocab_size)
  batch.pop("row_ids")
  ref = np.asarray(logprobs.sequence_logps(MODEL, base, batch).logps)
  with_columns = dict(batch, ref_chosen_logps=ref[0::2], ref_rejected_logps=ref[1::2])
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  state = step.TrainState(jnp.zeros((), jnp.int32), adapters, optimizer.init(adapters))
  run = jax.jit(functools.partial(step.train_step, model=MODEL, optimizer=optimizer, schedule=schedule,
                                  loss_cfg=CONFIG.loss, lora=ALL))
  (a1, m1), (a2, m2) = run(state, base, batch), run(state, base, with_columns)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  assert _adapter_diff(a1.params, a2.params).max() <= 1e-6
  shifted = dict(with_columns, ref_chosen_logps=ref[0::2] + 1.0)  # the columns, not a forward, are what it reads
  assert float(run(state, base, shifted)[1]["loss"]) > float(m1["loss"]) + 1e-3


def test_the_kv_cached_sampler_runs_the_adapters(base):
  """Sampling a LoRA policy: the cached decode applies the adapters, so the log-probs it reports are what the
  scorer gives the samples under the policy (and not under the base)."""
  from dpo_jax import sample
  adapters = perturbed(lora.init_adapters(MODEL, ALL, jax.random.key(9)), scale=0.3)
  policy = lora.LoraParams(base, adapters, ALL)
  prompts = np.array([[0, 0, 5, 6, 7], [0, 8, 9, 10, 11]], np.int32)
  mask = (np.arange(5)[None] >= np.array([[2], [1]])).astype(np.int32)
  tokens, token_logps = sample.generate(MODEL_CFG, policy, prompts, mask, rng=jax.random.key(0), max_new_tokens=6,
                                        eos_id=1, pad_id=0, return_logps=True)
  batch = sample.completions_to_batch(prompts, mask, np.asarray(tokens), pad_id=0, eos_id=1, max_length=11)
  scored = logprobs.sequence_logps(MODEL, policy, batch).logps
  np.testing.assert_allclose(np.asarray(token_logps).sum(-1), scored, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(scored) - np.asarray(logprobs.sequence_logps(MODEL, base, batch).logps)).max() > 1e-2


@pytest.mark.slow
def test_every_loss_variant_and_batch_layout_trains_adapters(base, pairs):
  adapters = perturbed(lora.init_adapters(MODEL, ALL, jax.random.key(6)))
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  state = step.TrainState(jnp.zeros((), jnp.int32), adapters, optimizer.init(adapters))
  configs = {t: override(get_config("tiny"), {"loss.type": t, "loss.beta": 0.2}).loss for t in losses.LOSSES
             if t != losses.RANKING_LOSS}

  @jax.jit
  def every_variant(state, base, batch):
    return {t: step.train_step(state, base, batch, model=MODEL, optimizer=optimizer, schedule=schedule, loss_cfg=c,
                               lora=ALL)[1]["loss"] for t, c in configs.items()}

  rows = preference.make_batch(pairs, np.arange(8), kind="dpo")
  shared = preference.make_batch(pairs, np.arange(8), kind=preference.SHARED)
  for batch in (rows, shared):
    batch.pop("row_ids")
  rows_losses, shared_losses = (jax.device_get(every_variant(state, base, b)) for b in (rows, shared))
  for loss_type in configs:
    assert np.isfinite(rows_losses[loss_type]), loss_type
    assert shared_losses[loss_type] == pytest.approx(rows_losses[loss_type], rel=1e-5, abs=1e-6), loss_type


def _adapter_diff(a, b):
  return np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).reshape(-1)
                         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])


@pytest.mark.slow
def test_on_8_devices_the_update_equals_one_device(base, pairs):
  """Rows, shared-prompt and packed batches over (data=2, fsdp=2, tensor=2) with 2 micro-batches: the same
  adapters after two steps as on one device (compared as the other mesh tests do: to 1% of a step)."""
  adapters = lora.init_adapters(MODEL, ALL, jax.random.key(7))
  rows = preference.make_batch(pairs, np.arange(16), kind="dpo")
  shared = preference.make_batch(pairs, np.arange(16), kind=preference.SHARED)
  _, packed = next(packing.iterate_packed_batches(pairs, global_batch=16, pairs_per_row=2, row_length=64, seed=0))
  lr = CONFIG.optim.learning_rate
  for name, local in (("rows", rows), ("shared", shared), ("packed", packed)):
    local = {k: v for k, v in local.items() if k != "row_ids"}
    (a1, h1), (a8, h8) = (run_steps(base, local, model_cfg=MODEL_CFG, config=CONFIG, mesh_sizes=mesh, devices=n,
                                    grad_accum_steps=accum, steps=2, lora=ALL, adapters=adapters)
                          for mesh, n, accum in (({"data": 1}, 1, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 8, 2)))
    for m1, m8 in zip(h1, h8):
      for k in ("loss", "grad_norm", "rewards/margins"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=f"{name} {k}")
    diff = _adapter_diff(a1, a8)
    assert diff.max() <= 2.5 * lr and np.mean(diff > 0.01 * lr) < 1e-3, (name, diff.max())


@pytest.mark.slow
def test_dropout_only_in_train_steps_and_the_same_on_any_mesh(base, pairs):
  dropout = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.3, targets=("all-linear",))
  adapters = perturbed(lora.init_adapters(MODEL, ALL, jax.random.key(8)))
  local = preference.make_batch(pairs, np.arange(8), kind="dpo")
  local.pop("row_ids")
  # evaluation and sampling pass no rng: the adapter's dropout is off, whatever the rate
  for spec in (ALL, dropout):
    np.testing.assert_array_equal(
        logprobs.sequence_logps(MODEL, lora.LoraParams(base, adapters, spec), local).logps,
        logprobs.sequence_logps(MODEL, lora.LoraParams(base, adapters, ALL), local).logps)
  runs = {(spec.dropout, n): run_steps(base, local, model_cfg=MODEL_CFG, config=CONFIG, mesh_sizes=mesh, devices=n,
                                       steps=2, lora=spec, adapters=adapters)
          for spec in (ALL, dropout) for mesh, n in (({"data": 1}, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 8))}
  assert runs[(0.3, 1)][1][0]["loss"] != pytest.approx(runs[(0.0, 1)][1][0]["loss"], rel=1e-4)  # masks applied
  for rate in (0.0, 0.3):  # threefry draws the same mask whatever the sharding
    np.testing.assert_allclose(runs[(rate, 8)][1][0]["loss"], runs[(rate, 1)][1][0]["loss"], rtol=2e-5)
    assert _adapter_diff(runs[(rate, 1)][0], runs[(rate, 8)][0]).max() <= 2.5 * CONFIG.optim.learning_rate


def tiny_lora(**overrides):
  c = get_config("tiny")
  c.progress_bar = False
  c.eval.num_prompts = 0
  return override(c, {"sft.steps": 40, "sft.learning_rate": 3e-3, "optim.total_steps": 80, "eval.every_steps": 0,
                      "optim.learning_rate": 5e-3, "lora.rank": 8, "lora.alpha": 16.0,
                      "lora.targets": ("all-linear",), **overrides})


@pytest.mark.slow
def test_the_trainer_runs_lora_dpo_resumes_exactly_and_exports(tmp_path):
  from peft import PeftModel
  from transformers import AutoModelForCausalLM
  import torch
  workdir = str(tmp_path / "run")
  summary = pipeline.run(tiny_lora(**{"hf.export": True, "lora.export": "both", "checkpoint_every_steps": 40}),
                      workdir)
  theta = summary["pi_theta"]
  assert theta["accuracy"] > 0.55 and theta["margin"] > 0 and theta["dpo_loss"] < math.log(2.0), theta

  # the checkpoint holds the adapters and their moments only
  directory = os.path.join(workdir, "dpo", "checkpoints")
  mngr = checkpoint.manager(directory, max_to_keep=2)
  final = mngr.latest_step()
  assert final == 80 and set(os.listdir(directory)) >= {"40", "80"}
  spec = lora.spec_from_config(tiny_lora().lora)
  optimizer, _ = optim.make_optimizer(dict(tiny_lora().optim))
  shardings = step.lora_state_shardings(MODEL, spec, optimizer, *_one_device_mesh())
  abstract = checkpoint.abstract_like(jax.eval_shape(
      lambda: step.create_train_state(lora.abstract_adapters(MODEL, spec), optimizer, shardings)), shardings)
  state, _ = checkpoint.restore_latest(mngr, abstract)
  assert model_lib.count_params(state.params) == model_lib.count_params(lora.abstract_adapters(MODEL, spec))

  # the exported PEFT folder and merged folder: both give the policy's log-probs
  exported = peft_io.load_peft_adapter(os.path.join(workdir, "hf_export"), MODEL, MODEL_CFG, expect=spec)[1]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, exported),
               jax.tree.map(np.asarray, jax.device_get(state.params)))
  base_dir = json.load(open(os.path.join(workdir, "hf_export", "adapter_config.json")))["base_model_name_or_path"]
  assert base_dir == os.path.abspath(os.path.join(workdir, "hf_base"))
  ids = torch.arange(2, 14)[None]
  with torch.no_grad():
    peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), os.path.join(
        workdir, "hf_export")).eval()(input_ids=ids).logits.numpy()
    merged_logits = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "hf_merged")).eval()(
        input_ids=ids).logits.numpy()
  np.testing.assert_allclose(merged_logits, peft_logits, rtol=1e-4, atol=1e-4)

  # exact resume: the run restarted from its step-40 checkpoint ends with the same adapters, bit for bit
  resumed = str(tmp_path / "resumed")
  os.makedirs(os.path.join(resumed, "dpo", "checkpoints"))
  import shutil
  shutil.copytree(os.path.join(workdir, "sft"), os.path.join(resumed, "sft"))
  shutil.copytree(os.path.join(directory, "40"), os.path.join(resumed, "dpo", "checkpoints", "40"))
  pipeline.run(tiny_lora(**{"checkpoint_every_steps": 40}), resumed)
  state2, _ = checkpoint.restore_latest(checkpoint.manager(os.path.join(resumed, "dpo", "checkpoints"),
                                                           max_to_keep=2), abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state2.params), jax.device_get(state.params))

  # continue from the exported adapter on its exported base, as from any PEFT folder
  again = pipeline.run(tiny_lora(**{"stage": "dpo", "hf.model_path": base_dir, "optim.total_steps": 5,
                                 "lora.adapter_path": os.path.join(workdir, "hf_export")}), str(tmp_path / "again"))
  assert again["pi_theta"]["accuracy"] > 0.55, again["pi_theta"]


def _one_device_mesh():
  from dpo_jax import sharding
  return sharding.make_mesh({"data": 1}, jax.devices()[:1]), CONFIG.sharding.rules


@pytest.mark.parametrize("overrides, match", [
    ({"hf.reference_path": "x"}, "config.hf.reference_path"),
    ({"lora.targets": ("qkv",)}, "config.lora.targets"),
    ({"lora.export": "zip"}, "config.lora.export"),
    ({"lora.adapter_path": "/nonexistent"}, "config.lora.adapter_path"),
])
def test_config_errors_name_the_field(tmp_path, overrides, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    config_checks.validate_config(tiny_lora(**overrides), 1)
