"""Context parallelism on 8 emulated devices: sequence-sharded attention, log-probs, loss and grads equal the
unsharded ones (dpo_jax/context_parallel.py)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_tokenized_pairs
from configs.default import get_config
from dpo_jax import attention, context_parallel as cp, logprobs, model as model_lib, sharding, step
from dpo_jax.data import packing, preference

CONFIG = get_config("tiny")
MODEL_CFG = dataclasses.replace(model_lib.ModelConfig.from_dict(CONFIG.model), attention_impl="xla")
RULES = sharding.DEFAULT_RULES
LOSS_CFG = {"type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0}
MAX_LENGTH = 23  # no sequence degree divides the widths: every layout below gets padded


def make_pairs(num_pairs, seed=0):
  """Random pairs whose prompts and responses vary in length (both paddings exercised)."""
  return random_tokenized_pairs(num_pairs, vocab=MODEL_CFG.vocab_size, max_length=MAX_LENGTH, seed=seed)


def make_batch(layout, num_pairs=4, seed=0):
  tokenized = make_pairs(num_pairs, seed)
  if layout == "packed":  # 2 rows of 2 pairs (4 segments), 93 tokens each
    return packing.make_packed_batch(tokenized, np.arange(num_pairs).reshape(2, -1), row_length=4 * MAX_LENGTH + 1)
  return preference.make_batch(tokenized, np.arange(num_pairs), kind=preference.SHARED if layout == "shared" else "dpo")


@pytest.fixture(scope="module")
def params():
  # Init std 0.3: logits as large as a trained model's, so attention is far from uniform and a wrong mask shows.
  return model_lib.init_params(dataclasses.replace(MODEL_CFG, initializer_range=0.3), jax.random.key(0))


def mesh_of(sizes):
  n = int(np.prod(list(sizes.values())))
  return sharding.make_mesh(sizes, jax.devices()[:n])


def loss_logps_grads(params, batch, cfg, mesh_sizes):
  """(per-sequence log-probs [N], DPO loss, grads) of `batch` on a mesh (None: no mesh, no constraints)."""
  shard = None if mesh_sizes is None else sharding.ShardingContext(mesh_of(mesh_sizes), RULES)
  model = model_lib.make_model(cfg, shard)

  def loss(p):
    seq = logprobs.sequence_logps(model, p, batch)
    ref_BxK = -20.0 - 0.5 * jnp.arange(seq.logps.shape[0], dtype=jnp.float32).reshape(-1, 2)
    value, _ = step.dpo_loss(p, ref_BxK, batch, model=model, loss_cfg=LOSS_CFG, total_weight=jnp.float32(1.0))
    return value, seq.logps

  (value, logps), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logps), float(value), jax.tree.map(np.asarray, grads)


def assert_same(got, want, what):
  logps_g, loss_g, grads_g = got
  logps_w, loss_w, grads_w = want
  np.testing.assert_allclose(logps_g, logps_w, rtol=1e-5, atol=1e-5, err_msg=f"{what}: sequence log-probs")
  np.testing.assert_allclose(loss_g, loss_w, rtol=1e-5, err_msg=f"{what}: DPO loss")
  worst, diff2, want2 = 0.0, 0.0, 0.0
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads_g), jax.tree.leaves(grads_w)):
    # fp32 summation order differs (sharded reductions). The whole gradient within 1e-5 of its norm; each leaf
    # within 3e-5 of its own (measured worst 9.3e-6: a CPU with other vector units sums in another order); every
    # element within 1e-4 of the leaf's largest (a tied embedding sums thousands of terms per row).
    rel = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12))
    worst = max(worst, rel)
    diff2, want2 = diff2 + float(np.sum((g - w) ** 2)), want2 + float(np.sum(w ** 2))
    assert rel < 3e-5, f"{what}: grad {jax.tree_util.keystr(path)} |g - want| / |want| = {rel:.3g}"
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * max(float(np.abs(w).max()), 1e-6),
                               err_msg=f"{what}: grad {jax.tree_util.keystr(path)}")
  total = (diff2 / want2) ** 0.5
  assert total < 1e-5, f"{what}: |grads - want| / |want| = {total:.3g}"
  print(f"{what}: max |dlogp| {np.abs(logps_g - logps_w).max():.3g} (|logp| up to {np.abs(logps_w).max():.3g}), "
        f"|dloss| {abs(loss_g - loss_w):.3g}, |dgrads| / |grads| {total:.3g}, worst leaf {worst:.3g}")


# ---- the token order ----

@pytest.mark.parametrize("balance", cp.LOAD_BALANCE)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_token_order_is_a_permutation_into_equal_shards(balance, n):
  length = cp.padded_length(37, n, balance)
  assert length % n == 0 and length >= 37 and length - 37 < cp.length_multiple(n, balance)
  order = cp.token_order(length, n, balance)
  np.testing.assert_array_equal(np.sort(order), np.arange(length))


@pytest.mark.parametrize("length", [2050, 4 * 521, 8191, 40000])
def test_padded_chunks_split_into_full_ring_blocks(length):
  """Every chunk of a padded length is a whole number of equal blocks of at most RING_BLOCK tokens (never the
  blocks of 1 a prime chunk would give), for little padding."""
  for n, balance in ((2, "zigzag"), (4, "none"), (8, "striped")):
    padded = cp.padded_length(length, n, balance)
    chunk = padded // cp.length_multiple(n, balance)
    blocks = -(-chunk // cp.RING_BLOCK)
    assert chunk % blocks == 0 and cp._block(chunk, cp.RING_BLOCK) == chunk // blocks, (length, n, balance)
    assert padded - length < cp.length_multiple(n, balance) * blocks, (length, n, balance, padded)


@pytest.mark.parametrize("length", [23, 1000, 4097])
def test_splash_chunks_are_whole_tiles(length):
  """With a quantum (splash under all_gather) every chunk is a multiple of it, with less than one quantum of
  padding per chunk."""
  for n, balance in ((2, "zigzag"), (4, "none"), (8, "zigzag")):
    padded = cp.padded_length(length, n, balance, quantum=128)
    chunks = cp.length_multiple(n, balance)
    assert padded % (chunks * 128) == 0 and 0 <= padded - length < chunks * 128, (length, n, balance, padded)


def test_zigzag_and_striped_layouts():
  np.testing.assert_array_equal(cp.token_order(8, 2, "zigzag"), [0, 1, 6, 7, 2, 3, 4, 5])
  np.testing.assert_array_equal(cp.token_order(8, 2, "striped"), [0, 2, 4, 6, 1, 3, 5, 7])
  np.testing.assert_array_equal(cp.token_order(8, 2, "none"), np.arange(8))
  with pytest.raises(ValueError, match="multiple of 4"):
    cp.token_order(6, 2, "zigzag")


@pytest.mark.parametrize("n", [2, 4, 8])
def test_load_balance_evens_the_causal_work(n):
  """Visible (query, key) pairs per shard of a causal sequence: 'none' puts ~2n - 1 times shard 0's work on the
  last shard; zig-zag gives every shard the same, striped to within (n - 1) L / n of ~L^2 / 2n (2.7% here)."""
  length = 64 * n
  work = {}
  for balance in cp.LOAD_BALANCE:
    order = cp.token_order(length, n, balance).reshape(n, -1)
    work[balance] = [(order_i[:, None] >= np.arange(length)[None, :]).sum() for order_i in order]
  assert max(work["none"]) / min(work["none"]) > 2 * n - 2
  assert max(work["zigzag"]) == min(work["zigzag"]), work["zigzag"]
  assert max(work["striped"]) / min(work["striped"]) < 1.03, work["striped"]


# ---- the attention kernels ----

@pytest.mark.parametrize("mode, n", [("ring", 1), ("ring", 2), ("ring", 4), ("ring", 8), ("all_gather", 2),
                                     ("all_gather", 4), ("all_gather", 8)])
@pytest.mark.slow
def test_context_parallel_attention_equals_plain_attention(mode, n, monkeypatch):
  """Forward and grads of q, k, v against the plain masked attention (GQA, two packed segments, padding); ring
  score blocks of 2 tokens, so every tile runs several query and key blocks."""
  monkeypatch.setattr(cp, "RING_BLOCK", 2)
  b, t, h, kv, d = 2, 32, 4, 2, 8
  rng = np.random.default_rng(n)
  q, k, v, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d),
                                                                       (b, t, h, d)))
  seg = np.ones((b, t), np.int32)
  seg[0, 20:], seg[1, 27:] = 2, 0
  seg = jnp.asarray(seg)
  want_out = attention.xla_attention(q, k, v, seg, MODEL_CFG)
  want_grads = jax.grad(lambda *a: (attention.xla_attention(*a, seg, MODEL_CFG) * w).sum(), argnums=(0, 1, 2))(q, k, v)
  for balance in cp.LOAD_BALANCE:
    cfg = dataclasses.replace(MODEL_CFG, context_parallel=mode, context_load_balance=balance)
    order = cp.token_order(t, n, balance)
    if n == 1:  # one shard: the ring kernel alone, no shard_map (all_gather of one shard is plain attention)
      static = cp._Static(axes=(), n=1, q_bounds=(0, t), k_bounds=(0, t), precision=None, compute_dtype=jnp.float32,
                          block=2)
      idx = jnp.arange(t, dtype=jnp.int32)
      attend = lambda q, k, v: cp.ring_attention_shard(static, q, k, v, idx, seg, idx, seg, jnp.zeros((b, t), bool))
    else:
      shard = sharding.ShardingContext(mesh_of({"data": 1, "sequence": n}), RULES)
      attend = lambda q, k, v: cp.attention(q[:, order], k[:, order], v[:, order], seg[:, order], cfg, shard)
    out = jax.jit(attend)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: (attend(*a) * w[:, order]).sum(), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[:, np.argsort(order)], want_out, rtol=1e-5, atol=2e-6,
                               err_msg=f"{mode} {balance} n={n}: output")
    for name, g, want in zip("qkv", grads, want_grads):
      np.testing.assert_allclose(g, want, rtol=1e-5, atol=5e-6, err_msg=f"{mode} {balance} n={n}: d{name}")


@pytest.mark.parametrize("n, balance, prompt", [(2, "zigzag", 256), (4, "zigzag", 0), (4, "none", 128),
                                                (8, "zigzag", 0)])
@pytest.mark.slow
def test_all_gather_with_the_splash_kernel_equals_plain_attention(n, balance, prompt):
  """all_gather with splash (Pallas interpret mode on CPU) on its causal key windows (`_splash_shard`): forward and
  grads of q, k, v (and a shared prompt's keys) against the plain masked attention; GQA, two packed segments or a
  partly padded prompt, padding. Padding queries see less under splash (attention.splash_attention) and are
  never scored, so they are left out of the comparison."""
  b, h, kv, d = 2, 4, 2, 16
  t = cp.padded_length(300, n, balance, quantum=128)
  rng = np.random.default_rng(n)
  q, k, v, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d),
                                                                       (b, t, h, d)))
  seg = np.ones((b, t), np.int32)
  if not prompt:
    seg[0, t // 3:] = 2
  seg[1, t - 37:] = 0
  w = w * jnp.asarray(seg > 0)[..., None, None]
  seg = jnp.asarray(seg)
  pk, pv = (jnp.asarray(rng.normal(size=(b, prompt, kv, d)), jnp.float32) for _ in range(2))
  seen = np.ones((b, prompt), bool)
  seen[0, :50] = False  # a left-padded prompt
  seen = jnp.asarray(seen)
  def prefix(pk, pv, order=slice(None)):
    return attention.Prefix(pk[:, order], pv[:, order], seen[:, order]) if prompt else None

  argnums = (0, 1, 2, 3, 4) if prompt else (0, 1, 2)
  plain = lambda q, k, v, pk, pv: attention.xla_attention(q, k, v, seg, MODEL_CFG, prefix(pk, pv))
  want_out = plain(q, k, v, pk, pv)
  want_grads = jax.grad(lambda *a: (plain(*a) * w).sum(), argnums=argnums)(q, k, v, pk, pv)
  cfg = dataclasses.replace(MODEL_CFG, attention_impl="splash", context_parallel="all_gather",
                            context_load_balance=balance)
  order, p_order = cp.token_order(t, n, balance), cp.token_order(prompt, n, balance) if prompt else None
  shard = sharding.ShardingContext(mesh_of({"data": 1, "sequence": n}), RULES)
  attend = lambda q, k, v, pk, pv: cp.attention(q[:, order], k[:, order], v[:, order], seg[:, order], cfg, shard,
                                                prefix=prefix(pk, pv, p_order))
  out = jax.jit(attend)(q, k, v, pk, pv)
  grads = jax.jit(jax.grad(lambda *a: (attend(*a) * w[:, order]).sum(), argnums=argnums))(q, k, v, pk, pv)
  real = np.asarray(seg > 0)[..., None, None]
  np.testing.assert_allclose(np.asarray(out)[:, np.argsort(order)] * real, want_out * real, rtol=1e-5, atol=2e-6,
                             err_msg=f"splash {balance} n={n}: output")
  for name, g, want in zip(("q", "k", "v", "prompt k", "prompt v"), grads, want_grads):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=5e-6, err_msg=f"splash {balance} n={n}: d{name}")


def test_a_tpu_all_gather_step_lowers_to_splash():
  """Exported for a TPU (no device needed): 'auto' under all_gather runs the splash kernels forward and backward
  on the sequence-sharded step; 'striped' (no static mask) falls back to XLA."""
  params = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  batch = make_batch("rows")
  for balance in ("zigzag", "striped"):
    cfg = dataclasses.replace(MODEL_CFG, context_parallel="all_gather", context_load_balance=balance,
                              attention_impl="auto", platform="tpu", compute_dtype="bfloat16")
    model = model_lib.make_model(cfg, sharding.ShardingContext(mesh_of({"data": 2, "sequence": 4}), RULES))
    fn = jax.jit(jax.grad(lambda p: logprobs.sequence_logps(model, p, batch).logps.sum()))
    text = jax.export.export(fn, platforms=["tpu"])(params).mlir_module()
    kernels = set(re.findall(r"splash_mha_(fwd|dq|dkv)_segmented", text))
    assert kernels == ({"fwd", "dq", "dkv"} if balance == "zigzag" else set()), (balance, kernels)
    assert "all_gather" in text and "reduce_scatter" in text, balance


# ---- log-probs, loss and grads of the model ----

@pytest.mark.parametrize("layout", ["rows", "packed", "shared"])
@pytest.mark.parametrize("mode, balance", [("ring", "zigzag"), ("ring", "none"), ("all_gather", "zigzag"),
                                           ("all_gather", "striped")])
@pytest.mark.slow
def test_sequence_sharded_step_equals_unsharded(params, layout, mode, balance):
  """mesh (data=2, sequence=4) against no mesh at all: log-probs, DPO loss and every grad (fp32, 1e-5)."""
  batch = make_batch(layout)
  want = loss_logps_grads(params, batch, MODEL_CFG, None)
  cfg = dataclasses.replace(MODEL_CFG, context_parallel=mode, context_load_balance=balance, logits_chunk_size=4)
  assert_same(loss_logps_grads(params, batch, cfg, {"data": 2, "sequence": 4}), want, f"{layout} {mode} {balance}")


@pytest.mark.parametrize("layout, balance", [("rows", "zigzag"), ("rows", "none"), ("packed", "zigzag"),
                                             ("shared", "zigzag")])
@pytest.mark.slow
def test_all_gather_with_splash_gives_the_unsharded_step(params, layout, balance):
  """all_gather with splash (interpret mode) in the model, data=2 x sequence=4: sequence_logps pads every chunk to
  splash's 128-token tiles (`chunk_quantum`); log-probs, loss and grads as without a mesh."""
  batch = make_batch(layout)
  want = loss_logps_grads(params, batch, MODEL_CFG, None)
  cfg = dataclasses.replace(MODEL_CFG, context_parallel="all_gather", context_load_balance=balance,
                            attention_impl="splash", logits_chunk_size=4)
  assert cp.chunk_quantum(cfg, 4) == 128 and cp.chunk_quantum(cfg, 1) == 0
  assert_same(loss_logps_grads(params, batch, cfg, {"data": 2, "sequence": 4}), want, f"{layout} splash {balance}")


@pytest.mark.parametrize("mode", cp.CONTEXT_PARALLEL)
@pytest.mark.slow
def test_scanned_rematted_layers_give_the_same_step(params, mode):
  """scan_layers + remat (the pod configuration) with sequence=4: same numbers; and the ring's masks are not
  hoisted out of the layer loop as stored residuals (`context_parallel._per_layer`; without it 4.5x here): the step's
  temporaries stay within 1.5x of the unscanned one's."""
  batch = make_batch("rows")
  want = loss_logps_grads(params, batch, MODEL_CFG, None)
  scanned = dataclasses.replace(MODEL_CFG, context_parallel=mode, scan_layers=True, remat="full")
  unscanned = dataclasses.replace(scanned, scan_layers=False)
  scanned_params = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
                    "layers": jax.tree.map(lambda *x: jnp.stack(x), *[params[f"layers_{i}"]
                                                                         for i in range(MODEL_CFG.num_layers)])}
  got = loss_logps_grads(scanned_params, batch, scanned, {"data": 2, "sequence": 4})
  got_grads = {**{k: v for k, v in got[2].items() if k != "layers"},
               **{f"layers_{i}": jax.tree.map(lambda x: x[i], got[2]["layers"]) for i in range(MODEL_CFG.num_layers)}}
  assert_same((got[0], got[1], got_grads), want, f"{mode} scan_layers remat")
  if mode == "ring":  # a long sequence, so stored per-step score blocks would dominate
    long = {k: np.tile(v, (1, 32)) if v.ndim == 2 else v for k, v in make_batch("rows").items()}
    temps = [_step_temp_bytes(c, p, long) for c, p in ((scanned, scanned_params), (unscanned, params))]
    assert temps[0] < 1.5 * temps[1], f"scanned {temps[0]} vs unscanned {temps[1]} bytes of temporaries"


def _step_temp_bytes(cfg, params, batch):
  model = model_lib.make_model(cfg, sharding.ShardingContext(mesh_of({"data": 2, "sequence": 4}), RULES))
  fn = jax.jit(jax.grad(lambda p: logprobs.sequence_logps(model, p, batch).logps.sum()))
  return fn.lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", cp.CONTEXT_PARALLEL)
@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.slow
def test_eight_way_sequence_sharding_with_unchunked_logits(params, layout, mode):
  batch = make_batch(layout)
  want = loss_logps_grads(params, batch, MODEL_CFG, None)
  cfg = dataclasses.replace(MODEL_CFG, context_parallel=mode)
  assert_same(loss_logps_grads(params, batch, cfg, {"data": 1, "sequence": 8}), want, f"{layout} {mode} seq=8")


def test_a_kernel_without_the_mask_is_refused():
  for impl, mode in (("cpu_blocked", "all_gather"), ("cudnn", "ring"), ("splash", "ring")):
    cfg = dataclasses.replace(MODEL_CFG, attention_impl=impl, context_parallel=mode)
    with pytest.raises(ValueError, match="model.attention_impl"):
      cp.validate(cfg, 4)
  striped = dataclasses.replace(MODEL_CFG, attention_impl="splash", context_parallel="all_gather",
                                context_load_balance="striped")
  with pytest.raises(ValueError, match="context_load_balance=zigzag"):
    cp.validate(striped, 4)
  for impl in ("splash", "cudnn", "xla", "auto"):
    cp.validate(dataclasses.replace(striped, attention_impl=impl, context_load_balance="zigzag"), 4)
  cp.validate(dataclasses.replace(MODEL_CFG, attention_impl="splash"), 1)  # no sequence axis: anything goes
  with pytest.raises(ValueError, match="context_parallel"):
    dataclasses.replace(MODEL_CFG, context_parallel="ulysses")


def test_the_model_called_outside_logprobs_names_the_fix(params):
  """Calling the sharded model on a length the layout cannot split raises, naming what pads for you."""
  shard = sharding.ShardingContext(mesh_of({"data": 1, "sequence": 4}), RULES)
  model = model_lib.make_model(MODEL_CFG, shard)
  ids = jnp.ones((2, 12), jnp.int32)
  with pytest.raises(ValueError, match="sequence_logps pads"):
    model.apply({"params": params}, ids, ids, ids)


@pytest.mark.slow
def test_vmapped_sweep_members_run_context_parallel(params):
  """experiments/sweep.py vmaps the step over stacked params: the ring and all_gather shard_maps under vmap give
  the unsharded grads of each member."""
  stacked = jax.tree.map(lambda x: jnp.stack([x, 1.01 * x]), params)
  batch = make_batch("rows")

  def grads(cfg, sizes):
    shard = None if sizes is None else sharding.ShardingContext(mesh_of(sizes), RULES)
    model = model_lib.make_model(cfg, shard)
    return jax.jit(jax.vmap(jax.grad(lambda p: logprobs.sequence_logps(model, p, batch).logps.sum())))(stacked)

  want = grads(MODEL_CFG, None)
  for mode in cp.CONTEXT_PARALLEL:
    got = grads(dataclasses.replace(MODEL_CFG, context_parallel=mode), {"data": 2, "sequence": 4})
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * float(np.abs(w).max()), err_msg=mode)
