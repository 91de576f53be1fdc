"""The decoder: causal, layouts and numerics options agree, GQA mapping, masks, logical axes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            num_kv_heads=2)
T = 10


def _inputs(b=2, t=T):
  ids = (jnp.arange(b * t).reshape(b, t) % (CFG.vocab_size - 2) + 2).astype(jnp.int32)
  return ids, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), jnp.ones((b, t), jnp.int32)


def _logits(cfg, params, *inputs):
  return model_lib.make_model(cfg).apply({"params": params}, *inputs)


def _stack_layers(params, num_layers):
  layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


@pytest.mark.slow
def test_causal_gradient_of_position_t_wrt_later_tokens_is_zero(params):
  """Every position holds a distinct token id, so the gradient of logits[t] with respect to embedding row
  ids[s] is the gradient with respect to the token at position s alone."""
  ids = jnp.arange(2, 2 + T, dtype=jnp.int32)[None]
  positions, mask = jnp.arange(T, dtype=jnp.int32)[None], jnp.ones((1, T), jnp.int32)
  for t in (0, 4, T - 1):
    def out_t(embedding):
      p = dict(params, embed={"embedding": embedding})
      return _logits(CFG, p, ids, positions, mask)[0, t].sum()
    grad_VxD = jax.grad(out_t)(params["embed"]["embedding"])
    norms = np.linalg.norm(np.asarray(grad_VxD)[np.asarray(ids[0])], axis=-1)  # per position s
    assert np.all(norms[t + 1:] == 0.0), f"logits at {t} depend on later positions: {norms}"
    assert np.all(norms[:t + 1] > 0.0), f"logits at {t} ignore earlier positions: {norms}"


def test_scan_layers_equals_unrolled(params):
  scanned = _stack_layers(jax.tree.map(lambda x: x, dict(params)), CFG.num_layers)
  cfg = dataclasses.replace(CFG, scan_layers=True)
  assert jax.tree.structure(scanned) == jax.tree.structure(model_lib.abstract_params(cfg))
  np.testing.assert_allclose(_logits(cfg, scanned, *_inputs()), _logits(CFG, params, *_inputs()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots_saveable", True), ("full", True)])
@pytest.mark.slow
def test_remat_changes_memory_not_math(params, remat, scan):
  p = _stack_layers(dict(params), CFG.num_layers) if scan else params
  cfg = dataclasses.replace(CFG, remat=remat, scan_layers=scan)
  base_cfg = dataclasses.replace(CFG, scan_layers=scan)
  loss = lambda c: (lambda p: jnp.mean(_logits(c, p, *_inputs()) ** 2))
  np.testing.assert_allclose(loss(cfg)(p), loss(base_cfg)(p), rtol=1e-6)
  for g, h in zip(jax.tree.leaves(jax.grad(loss(cfg))(p)), jax.tree.leaves(jax.grad(loss(base_cfg))(p))):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True, mlp_bias=True),
                                       dict(compute_dtype="bfloat16"), dict(remat="full", scan_layers=True)])
@pytest.mark.slow
def test_row_major_weight_grad_changes_layout_not_math(overrides):
  """`weight_grad_gemm='row_major'` (the CPU default) against XLA's own weight-gradient layout: the same
  logits, the same gradient for every param (fp32 to rounding; bf16 to bf16 rounding), the same param tree."""
  xla = dataclasses.replace(CFG, weight_grad_gemm="xla", **overrides)
  row = dataclasses.replace(xla, weight_grad_gemm="row_major")
  p = model_lib.init_params(xla, jax.random.key(3))
  assert jax.tree.structure(p) == jax.tree.structure(model_lib.init_params(row, jax.random.key(3)))
  ids, positions, mask = _inputs()
  loss = lambda c: (lambda p: jnp.mean(jnp.sin(_logits(c, p, ids, positions, mask))))
  tol = dict(rtol=2e-2, atol=2e-4) if "compute_dtype" in overrides else dict(rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss(row)(p), loss(xla)(p), **tol)
  grads_row, grads_xla = jax.grad(loss(row))(p), jax.grad(loss(xla))(p)
  for path, g in jax.tree_util.tree_leaves_with_path(grads_row):
    h = functools.reduce(lambda t, k: t[k.key], path, grads_xla)
    assert g.dtype == h.dtype, path
    np.testing.assert_allclose(g, h, **tol, err_msg=jax.tree_util.keystr(path))
  if "compute_dtype" not in overrides:  # not all zero: the comparison means something
    assert float(jnp.abs(grads_row["embed"]["embedding"]).max()) > 0


def test_row_major_weight_grad_is_a_row_major_gemm_on_cpu():
  """The reason it exists: XLA:CPU compiles the default weight gradient x^T dy as a dot contracting dim 0 (the
  token axis) of an operand, which it lays out by copying that operand transposed (or runs on Eigen); the
  row-major form leaves no such dot for any projection (attention, MLP, LM head)."""
  ids, positions, mask = _inputs()

  def token_contracting_dots(weight_grad_gemm):
    cfg = dataclasses.replace(CFG, weight_grad_gemm=weight_grad_gemm, tie_embeddings=False)
    p = model_lib.init_params(cfg, jax.random.key(0))
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(_logits(cfg, p, ids, positions, mask)))).lower(p).compile().as_text()
    token_axis = [line for line in hlo.splitlines() if " dot(" in line and "lhs_contracting_dims={0}" in line]
    return {name for line in token_axis for name in ("/attn/", "/mlp/", "Decoder.logits") if name in line}
  if jax.default_backend() != "cpu":
    pytest.skip("an XLA:CPU layout check")
  assert token_contracting_dots("xla"), "XLA:CPU no longer emits token-contracting dots; weight_grad_gemm may be moot"
  assert not token_contracting_dots("row_major")
  assert model_lib._row_major_weight_grad(dataclasses.replace(CFG, weight_grad_gemm="auto"))


def test_bf16_compute_keeps_fp32_params_and_logits(params):
  cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
  out = _logits(cfg, params, *_inputs())
  assert out.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ref = _logits(CFG, params, *_inputs())
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-2
  bf16_params = model_lib.init_params(dataclasses.replace(cfg, param_dtype="bfloat16"), jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_params))


def test_gqa_equals_multi_head_with_repeated_kv_heads(params):
  """Query head h reads kv head h // (H / K), the HF repeat_kv convention."""
  mha_cfg = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
  groups = CFG.num_heads // CFG.num_kv_heads
  mha = jax.tree.map(lambda x: x, params)
  for i in range(CFG.num_layers):
    for name in ("k", "v"):
      kernel = params[f"layers_{i}"]["attn"][name]["kernel"]  # [D, K, Dh]
      mha[f"layers_{i}"]["attn"][name] = {"kernel": jnp.repeat(kernel, groups, axis=1)}
  np.testing.assert_allclose(_logits(mha_cfg, mha, *_inputs()), _logits(CFG, params, *_inputs()), rtol=1e-5, atol=1e-5)


def test_segments_see_only_themselves(params):
  """Two sequences packed in one row (segment ids 1 and 2, positions restarting) score as if alone."""
  ids, _, _ = _inputs(b=1, t=12)
  a, b = ids[:, :5], ids[:, 5:]
  pos = lambda n: jnp.arange(n, dtype=jnp.int32)[None]
  packed_pos = jnp.concatenate([pos(5), pos(7)], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 5), jnp.int32), 2 * jnp.ones((1, 7), jnp.int32)], axis=1)
  packed = _logits(CFG, params, ids, packed_pos, seg)
  np.testing.assert_allclose(packed[:, :5], _logits(CFG, params, a, pos(5), jnp.ones((1, 5), jnp.int32)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:], _logits(CFG, params, b, pos(7), jnp.ones((1, 7), jnp.int32)), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_and_biases():
  cfg = dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True)
  p = model_lib.init_params(cfg, jax.random.key(1))
  assert "lm_head" not in p
  attn = p["layers_0"]["attn"]
  assert attn["q"]["bias"].shape == (4, 8) and attn["k"]["bias"].shape == (2, 8) and attn["o"]["bias"].shape == (32,)
  assert p["layers_0"]["mlp"]["up"]["bias"].shape == (64,)
  model = model_lib.make_model(cfg)
  hidden = model.apply({"params": p}, *_inputs(), method=model_lib.Decoder.hidden)
  np.testing.assert_allclose(model.apply({"params": p}, *_inputs()), hidden @ p["embed"]["embedding"].T, rtol=1e-5, atol=1e-5)


def test_every_param_has_logical_axes_of_its_rank():
  for cfg in (CFG, dataclasses.replace(CFG, scan_layers=True, qkv_bias=True)):
    axes = model_lib.param_logical_axes(cfg)
    shapes = model_lib.abstract_params(cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for a, s in zip(flat_axes, jax.tree.leaves(shapes)):
      assert len(a) == len(s.shape) and all(isinstance(n, str) for n in a), (a, s.shape)
    if cfg.scan_layers:
      assert axes["layers"]["mlp"]["up"]["kernel"] == ("layers", "embed", "mlp")


def test_bad_config_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    dataclasses.replace(CFG, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat="):
    dataclasses.replace(CFG, remat="some")
  with pytest.raises(ValueError, match="weight_grad_gemm="):
    dataclasses.replace(CFG, weight_grad_gemm="col_major")
  with pytest.raises(ValueError, match="unknown fields"):
    model_lib.ModelConfig.from_dict(dict(dataclasses.asdict(CFG), hiden_size=3))
