"""benchmarks/dpo_step.py: released models' shapes on both sides (tied embeddings, Qwen2 biases), its variants and
its header, on a micro shape in one process."""

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
