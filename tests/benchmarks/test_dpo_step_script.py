"""benchmarks/dpo_step.py: released models' shapes on both sides (tied embeddings, Qwen2 biases), its variants and
its header, on a micro shape in one process; the `moe` config's Mixtral on the torch side and its three rows."""

import dataclasses

import jax
import numpy as np
import pytest

from benchmarks import dpo_step as bench
from dpo_jax import model as model_lib

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"])
def test_released_shapes_build_the_same_model_in_torch(name):
  """Each shape, shrunk to 2 layers and a 512-token vocabulary, gives torch's logits on the same weights: a tied
  head is one tensor with the embedding on the torch side, as the released checkpoint loads."""
  import torch
  fields = dict(bench.CONFIGS[name][0], num_layers=2, vocab_size=512)
  assert fields["tie_embeddings"]
  cfg = model_lib.ModelConfig(**fields, compute_dtype="float32", matmul_precision="highest")
  params = jax.device_get(model_lib.init_params(cfg, jax.random.key(0)))
  policy, reference = bench.torch_models(cfg, params, "fp32", model_type=bench.HF_TYPES.get(name, "llama"))
  assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
  ids = np.random.default_rng(0).integers(1, 512, size=(2, 24)).astype(np.int32)
  ours = model_lib.make_model(cfg).apply({"params": params}, ids, np.broadcast_to(np.arange(24), ids.shape),
                                         np.ones_like(ids))
  with torch.no_grad():
    theirs = reference(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=2e-4, atol=2e-4)


def test_cpu_description_names_the_model_and_vector_extensions():
  from dpo_jax import platforms
  text = platforms.cpu_description()
  model, _, flags = text.partition("; ")
  assert model and flags


def test_a_run_prints_the_variants_and_memory_of_every_row(monkeypatch, capsys):
  """A micro tied shape, in one process: the jax rows (default, rows layout, a variant) and torch each print a
  first loss of log 2 and a peak memory measured the same way; the table has a line per row."""
  monkeypatch.setitem(bench.CONFIGS, "micro", (dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                    num_layers=2, num_heads=4, num_kv_heads=2,
                                                    tie_embeddings=True), 2, 32))
  monkeypatch.setattr(bench, "measure_peak", lambda dtype: {"jax": 1e11, "torch": 1e11})
  bench.main(["--config", "micro", "--repeats", "1", "--skip", "trl,jax-preref", "--no-isolate",
              "--variants", "nochunk,attnstore"])
  out = capsys.readouterr().out
  assert "CPU: " in out.splitlines()[1]
  for key in ("jax", "jax-rows", "jax-nochunk", "jax-attnstore", "torch"):
    assert f"warm-up: {key} done, first loss 0.6931" in out, out
    assert any(line.startswith(f"micro         {key} ") and "MiB" in line for line in out.splitlines()), out
  assert "compiled)" in out


def moe_micro(layers: int = 2) -> tuple[model_lib.ModelConfig, dict]:
  """The `moe` config's shape with `layers` layers, fp32 at full matmul precision, and its params."""
  cfg = model_lib.ModelConfig(**dict(bench.CONFIGS["moe"][0], num_layers=layers), compute_dtype="float32",
                              matmul_precision="highest")
  return cfg, jax.device_get(model_lib.init_params(cfg, jax.random.key(0)))


def test_the_moe_config_builds_the_same_mixtral_in_torch():
  """The torch row's MixtralForCausalLM (`torch_models(..., "mixtral")`) on the same weights gives our logits and
  our load-balancing loss (transformers' `aux_loss`), so the torch arm times the same model and the same router
  term."""
  import torch
  from dpo_jax import moe
  cfg, params = moe_micro()
  policy, reference = bench.torch_models(cfg, params, "fp32", model_type=bench.HF_TYPES["moe"])
  assert type(policy).__name__ == "MixtralForCausalLM"
  assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
  ids = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(2, 24)).astype(np.int32)
  ours, router = model_lib.make_model(cfg).apply({"params": params}, ids, np.broadcast_to(np.arange(24), ids.shape),
                                                 np.ones_like(ids), mutable=[moe.ROUTER])
  with torch.no_grad():
    theirs = reference(input_ids=torch.as_tensor(ids, dtype=torch.long), output_router_logits=True)
  np.testing.assert_allclose(np.asarray(ours), theirs.logits.numpy(), rtol=2e-4, atol=2e-4)
  aux = float(moe.load_balancing_loss(moe.stack_router_sums(router[moe.ROUTER])))
  assert aux > 1.0  # E * sum(f_e P_e) with k = 2 routed experts: 2 when balanced
  assert float(theirs.aux_loss) == pytest.approx(aux, rel=1e-5)


@pytest.mark.slow  # ~30 s on a 2-core CPU: three steps compiled or built, in one process
def test_the_moe_config_times_ragged_dense_and_mixtral(monkeypatch, capsys):
  """`--config moe` at a smoke size, in one process: its four rows (ours 'auto' = tiled on CPU, ragged, dense
  one-hot, torch's Mixtral) each print the first DPO loss log 2 and the router aux loss they add, with one
  coefficient; the jax rows route identically, torch's aux differs only by its layout (each prompt counted twice);
  the table has exactly those four rows with a ratio to torch."""
  monkeypatch.setitem(bench.CONFIGS, "moe", (dict(bench.CONFIGS["moe"][0], num_layers=2), 2, 32))
  monkeypatch.setattr(bench, "measure_peak", lambda dtype: {"jax": 1e11, "torch": 1e11})
  bench.main(["--config", "moe", "--repeats", "1", "--no-isolate"])
  out = capsys.readouterr().out
  assert "CPU: " in out.splitlines()[1]
  assert "router aux coefficient 0.001 in each" in out, out
  assert "torch: MixtralForCausalLM, experts_implementation" in out, out
  aux = {}
  for key in ("jax", "jax-ragged", "jax-dense", "torch"):
    (line,) = [line for line in out.splitlines() if line.startswith(f"  warm-up: {key} done")]
    assert "first loss 0.6931" in line, line
    aux[key] = float(line.split("router aux loss ")[1].split(";")[0])
  assert aux["jax"] == pytest.approx(aux["jax-dense"], rel=1e-5) == pytest.approx(aux["jax-ragged"], rel=1e-5)
  assert aux["torch"] == pytest.approx(aux["jax"], rel=0.02) and aux["jax"] > 1.0, aux
  table = [line.split() for line in out.splitlines() if line.startswith("moe ")]
  assert [row[1] for row in table] == ["jax", "jax-ragged", "jax-dense", "torch"], out
  for row in table:  # step s, tokens/s and x torch are positive numbers; torch's ratio to itself is 1
    assert float(row[2]) > 0 and float(row[4]) > 0 and float(row[5]) > 0, row
  assert float(table[3][5]) == 1.0


def test_the_dense_variant_needs_an_moe_config(capsys):
  with pytest.raises(SystemExit):
    bench.main(["--config", "tiny", "--variants", "dense"])
  assert "--variants dense: an MoE variant" in capsys.readouterr().err


def test_unknown_variants_are_refused(capsys):
  with pytest.raises(SystemExit):
    bench.main(["--config", "tiny", "--variants", "fast"])
  assert "--variants: unknown ['fast']" in capsys.readouterr().err


def test_a_shape_that_cannot_fit_in_ram_is_skipped_with_the_reason(monkeypatch, capsys):
  monkeypatch.setattr(bench.host_memory, "available_ram", lambda: 2 ** 30)
  monkeypatch.setattr(bench, "measure_peak", lambda dtype: {"jax": 1e11, "torch": 1e11})
  bench.main(["--config", "llama-3.2-1b", "--repeats", "1", "--no-isolate"])
  out = capsys.readouterr().out
  assert "skipped: fp32 params, AdamW moments, gradients and pi_ref alone are 23.0 GiB" in out, out
  assert dataclasses.is_dataclass(bench.model_config("llama-3.2-1b", "fp32", "none"))
