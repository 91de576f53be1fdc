"""Mixture of experts (dpo_jax/moe.py): the three expert kernels agree, the router sums and losses follow their
formulas, the DPO step adds the router terms, and expert parallelism (mesh 'expert') gives the one-device loss
and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from dpo_jax import model as model_lib, moe, step
from tests.batches import random_dpo_batch
from tests.train_steps import run_steps

CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                            num_kv_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                            router_aux_loss_coef=0.01, matmul_precision="highest")


def _inputs(b=3, t=9, seed=1):
  ids = jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32).at[0, :3].set(0)  # a left-padded row
  return ids, pos, seg


def _forward(cfg, params, *collections):
  return model_lib.make_model(cfg).apply({"params": params}, *_inputs(), mutable=list(collections))


def test_router_picks_renormalised_top_k():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
  probs, w, e = moe.route(logits, 2, normalize=True)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(e, [[0, 1], [2, 0]])  # ties to the lower index, as torch.topk
  p = np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum()
  np.testing.assert_allclose(w[0], p, rtol=1e-6)
  _, w_raw, _ = moe.route(logits, 2, normalize=False)
  np.testing.assert_allclose(w_raw[0], np.exp([2.0, 1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum(), rtol=1e-6)


@pytest.mark.parametrize("impl", ["tiled", "dense", "capacity"])
def test_kernels_match_dropless(impl):
  params = model_lib.init_params(CFG, jax.random.key(0))
  ragged_cfg = dataclasses.replace(CFG, moe_impl="ragged")
  other_cfg = dataclasses.replace(CFG, moe_impl=impl, moe_capacity_factor=8.0)
  ragged, _ = _forward(ragged_cfg, params)
  other, _ = _forward(other_cfg, params)
  np.testing.assert_allclose(other, ragged, rtol=1e-5, atol=1e-6)
  grad = lambda cfg: jax.grad(lambda p: jnp.sum(model_lib.make_model(cfg).apply({"params": p}, *_inputs()) ** 2))(
      params)
  for a, b in zip(jax.tree.leaves(grad(other_cfg)), jax.tree.leaves(grad(ragged_cfg))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_auto_is_tiled_on_cpu_and_ragged_on_accelerators():
  assert moe.resolve_impl(CFG) == "tiled"
  for platform in ("tpu", "gpu"):
    assert moe.resolve_impl(dataclasses.replace(CFG, platform=platform)) == "ragged"
  # A group that fills tiles unevenly: the padded layout still holds every assignment once.
  assert moe.tile_rows(54, 8) == 8 and moe.tile_rows(10_000, 8) == 64


def test_capacity_drops_and_counts():
  params = model_lib.init_params(CFG, jax.random.key(0))
  cfg = dataclasses.replace(CFG, moe_impl="capacity", moe_capacity_factor=0.5)
  _, col = _forward(cfg, params, moe.ROUTER)
  sums = moe.stack_router_sums(col[moe.ROUTER])
  # 27 tokens x 2 = 54 assignments, capacity ceil(0.5 * 54 / 8) = 4 per expert: at least 54 - 32 dropped in all.
  assert moe.capacity(cfg, 54) == 4
  n = 27 * 2
  dropped = np.asarray(sums["dropped"])
  assert (dropped >= 0).all() and dropped.max() <= n
  assert (np.asarray(moe.load_metrics(sums)["dropped"]) > 0.2).all()


def test_load_balancing_loss_is_the_hf_formula():
  params = model_lib.init_params(CFG, jax.random.key(0))
  _, col = _forward(CFG, params, moe.ROUTER, moe.ROUTER_LOGITS)
  sums = moe.stack_router_sums(col[moe.ROUTER])
  # By hand from the raw logits, as transformers' load_balancing_loss_func with an attention mask.
  logits = np.concatenate([np.asarray(col[moe.ROUTER_LOGITS][f"layers_{i}"]["mlp"]["logits"][0]).reshape(-1, 8)
                           for i in range(2)])
  mask = np.tile(np.asarray(_inputs()[2]).reshape(-1) > 0, 2).astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
  counts = np.zeros(8)
  for row, m in zip(top, mask):
    counts[row] += m
  f, p = counts / mask.sum(), (probs * mask[:, None]).sum(0) / mask.sum()
  np.testing.assert_allclose(moe.load_balancing_loss(sums), 8 * np.sum(f * p), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(moe.router_z_loss(sums), np.sum(mask * lse ** 2) / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sums["tokens"]), [mask.sum() / 2] * 2)


def test_layer_pattern_and_scan():
  cfg = dataclasses.replace(CFG, num_layers=4, moe_layer_step=2, dense_layers=(3,))
  assert moe.moe_layers(cfg) == (1,)  # (i + 1) % 2 == 0 -> 1, 3; 3 is dense
  params = model_lib.init_params(cfg, jax.random.key(0))
  assert "kernel" in params["layers_0"]["mlp"]["gate"] and params["layers_1"]["mlp"]["gate"].shape == (8, 16, 8)
  with pytest.raises(ValueError, match="scan_layers=True needs every layer alike"):
    dataclasses.replace(cfg, scan_layers=True)
  scanned = dataclasses.replace(CFG, scan_layers=True)
  stacked = model_lib.init_params(scanned, jax.random.key(0))
  assert stacked["layers"]["mlp"]["up"].shape == (2, 8, 16, 8)
  per_layer = {f"layers_{i}": jax.tree.map(lambda x: x[i], stacked["layers"]) for i in range(2)}
  per_layer.update({k: v for k, v in stacked.items() if k != "layers"})
  (a, col_a), (b, col_b) = _forward(scanned, stacked, moe.ROUTER), _forward(CFG, per_layer, moe.ROUTER)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for k, v in moe.stack_router_sums(col_a[moe.ROUTER]).items():
    np.testing.assert_allclose(v, moe.stack_router_sums(col_b[moe.ROUTER])[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    (dict(moe_impl="megablox"), "moe_impl='megablox'"),
    (dict(moe_layer_step=0), "moe_layer_step=0"),
    (dict(mlp_bias=True), "mlp_bias=True"),
])
def test_config_errors_name_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(CFG, **bad)


def _config(coef=None, z=0.0):
  c = default_config.get_config("tiny")
  c.loss.router_aux_coef = coef
  c.loss.router_z_coef = z
  c.optim.update(learning_rate=1e-2, warmup_steps=0)
  return c


def test_dpo_step_adds_the_router_terms():
  params = model_lib.init_params(CFG, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in random_dpo_batch(0, 4, 12, CFG.vocab_size).items() if k != "row_ids"}
  model = model_lib.make_model(CFG)
  c = _config()

  def objective(p, coef, z=0.0):
    loss_cfg = dict(c.loss, router_aux_coef=coef, router_z_coef=z)
    ref = step.reference_logps(model, params, batch, needed=True)
    return step.dpo_loss(p, ref, batch, model=model, loss_cfg=loss_cfg, total_weight=jnp.float32(4.0))

  base, sums = objective(params, 0.0)
  with_aux, _ = objective(params, 0.5)
  with_z, _ = objective(params, 0.0, 0.25)
  metrics = step.finalize_metrics(sums)
  np.testing.assert_allclose(base, metrics["loss"], rtol=1e-6)  # log 2 at pi == pi_ref
  np.testing.assert_allclose(with_aux - base, 0.5 * metrics["router/aux"], rtol=1e-5)
  np.testing.assert_allclose(with_z - base, 0.25 * metrics["router/z"], rtol=1e-5)
  assert 1.0 <= float(metrics["router/aux"]) <= 8 / 2  # between balanced (k=... normalised to 1) and collapsed
  assert {f"router/load/layer_{i}" for i in range(2)} <= set(metrics)
  # Default coefficient: the checkpoint's router_aux_loss_coef.
  default_obj, _ = step.dpo_loss(params, step.reference_logps(model, params, batch, needed=True), batch, model=model,
                                 loss_cfg=dict(c.loss), total_weight=jnp.float32(4.0))
  np.testing.assert_allclose(default_obj - base, 0.01 * metrics["router/aux"], rtol=1e-5)
  # The router gets a gradient only through the router terms at pi == pi_ref... and through DPO's loss.
  g0 = jax.grad(lambda p: objective(p, 0.0)[0])(params)["layers_0"]["mlp"]["router"]
  g1 = jax.grad(lambda p: objective(p, 0.5)[0])(params)["layers_0"]["mlp"]["router"]
  assert float(jnp.abs(g1 - g0).max()) > 1e-6


def _loss_and_grads(cfg, mesh_sizes, devices):
  """(loss, metrics, grads) of one DPO objective (router terms included) on a mesh of the first `devices`."""
  from dpo_jax import sharding
  rules = default_config.SHARDING_RULES
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:devices])
  shard = sharding.ShardingContext(mesh, rules)
  model = model_lib.make_model(cfg, shard)
  params = jax.device_put(model_lib.init_params(cfg, jax.random.key(0)), step.param_shardings(cfg, mesh, rules))
  local = {k: v for k, v in random_dpo_batch(3, 8, 12, cfg.vocab_size).items() if k != "row_ids"}
  batch = sharding.global_batch(mesh, rules, local)
  loss_cfg = dict(_config(coef=0.1).loss)

  def objective(p):
    ref = step.reference_logps(model, params, batch, needed=True)
    p = jax.tree.map(lambda x: x * 1.01, p)  # pi != pi_ref, so DPO's gradient is not symmetric
    return step.dpo_loss(p, ref, batch, model=model, loss_cfg=loss_cfg, total_weight=jnp.float32(8.0))

  fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
  if dict(mesh.shape)["expert"] > 1:  # the experts really are split, and tokens travel all-to-all
    assert params["layers_0"]["mlp"]["gate"].addressable_shards[0].data.shape[0] == cfg.num_experts // 4
    assert "all-to-all" in fn.lower(params).compile().as_text()
  (loss, sums), grads = fn(params)
  return jax.device_get((loss, step.finalize_metrics(sums), grads))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [dict(data=2, expert=4), dict(fsdp=2, expert=4), dict(expert=4, tensor=2)])
def test_expert_parallel_matches_one_device(mesh_sizes):
  ref_loss, ref_metrics, ref_grads = _loss_and_grads(CFG, dict(data=1), 1)
  loss, metrics, grads = _loss_and_grads(CFG, mesh_sizes, 8)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ("router/aux", "router/z", "logps/chosen", "logps/rejected", "router/load/layer_1"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert float(ref_metrics["router/aux"]) > 1.0
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    ref = ref_grads
    for key in path:
      ref = ref[key.key]
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_expert_parallel_trains_like_one_device():
  """Two Adam steps through the trainer's jitted step (declared shardings) on expert x data."""
  params = model_lib.init_params(CFG, jax.random.key(0))
  local = {k: v for k, v in random_dpo_batch(3, 8, 12, CFG.vocab_size).items() if k != "row_ids"}
  run = lambda mesh, devices, cfg=CFG: run_steps(params, local, model_cfg=cfg, config=_config(coef=0.1),
                                                 mesh_sizes=mesh, devices=devices, steps=2)[1]
  ref = run(dict(data=1), 1)
  for hist in (run(dict(data=2, expert=4), 8),
               run(dict(data=2, expert=4), 8, dataclasses.replace(CFG, moe_impl="capacity", moe_capacity_factor=64.0))):
    for key in ("loss", "router/aux", "rewards/margins", "grad_norm"):
      np.testing.assert_allclose([h[key] for h in hist], [h[key] for h in ref], rtol=1e-5, err_msg=key)
    assert hist[-1]["router/dropped"] == 0.0


def test_shared_prompt_forward_sums_both_streams():
  """A shared-prompt forward (prompts once, K responses each) sows per stream; the router sums add them."""
  params = model_lib.init_params(CFG, jax.random.key(0))
  ids, pos, seg = _inputs(b=2, t=5)
  resp = jax.random.randint(jax.random.key(5), (4, 3), 0, CFG.vocab_size)
  resp_pos, resp_seg = jnp.broadcast_to(5 + jnp.arange(3), (4, 3)), jnp.ones((4, 3), jnp.int32).at[0, 2].set(0)
  _, col = model_lib.make_model(CFG).apply({"params": params}, (ids, resp), (pos, resp_pos), (seg, resp_seg),
                                           method="hidden", mutable=[moe.ROUTER])
  sums = moe.stack_router_sums(col[moe.ROUTER])
  np.testing.assert_allclose(sums["tokens"], [float(seg.sum() + resp_seg.sum())] * 2)
  np.testing.assert_allclose(sums["expert_tokens"].sum(-1), 2 * sums["tokens"])  # k = 2 assignments per token


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [dict(fsdp=2, expert=4), dict(expert=4, tensor=2)])
def test_expert_parallel_lora_matches_one_device(mesh_sizes):
  """Expert adapters inside the expert-parallel shard_map (gathered over fsdp; the down adapter's rank product
  summed over 'tensor'): the adapted forward and the adapters' gradients equal one device's."""
  from dpo_jax import lora, sharding
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj",) + lora.EXPERT_TARGETS)
  params = model_lib.init_params(CFG, jax.random.key(0))
  adapters = lora.init_adapters(model_lib.make_model(CFG), spec, jax.random.key(1))
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(adapters))))
  adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)
  ids, pos, seg = (jnp.tile(a, (8, 1))[:8] for a in _inputs())

  def run(sizes, devices):
    rules = default_config.SHARDING_RULES
    mesh = sharding.make_mesh(sizes, jax.devices()[:devices])
    model = model_lib.make_model(CFG, sharding.ShardingContext(mesh, rules))
    base = jax.device_put(params, step.param_shardings(CFG, mesh, rules))
    ads = jax.device_put(adapters, step.adapter_shardings(model, spec, mesh, rules))
    loss = lambda a: jnp.sum(model_lib.apply_params(model, lora.LoraParams(base, a, spec), ids, pos, seg) ** 2)
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(ads))

  (ref_loss, ref_grads), (loss, grads) = run(dict(data=1), 1), run(mesh_sizes, 8)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale)
  assert float(np.abs(ref_grads["layers_0"]["mlp"]["down_lora"]["b"]).max()) > 0
