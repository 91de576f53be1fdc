"""`--dry_run`: per-param shardings and per-device memory from abstract shapes, checked against arithmetic."""

import os
import subprocess
import sys

import jax
import pytest

from configs.default import get_config
from dpo_jax import model as model_lib
from dpo_jax.train import dry_run
from config_overrides import override
from paths import REPO_ROOT
from subprocess_env import with_emulated_devices

ROOT = REPO_ROOT


def config(**overrides):
  c = get_config("tiny")
  return override(c, overrides)


def test_fsdp_divides_every_sharded_param_and_adam_holds_two_moments(capsys):
  one = dry_run.report(config(**{"mesh.data": 8, "mesh.fsdp": 1}), compile_step=False)
  fsdp = dry_run.report(config(**{"mesh.data": 1, "mesh.fsdp": 8}), compile_step=False)
  out = capsys.readouterr().out
  c = config()
  abstract = model_lib.abstract_params(model_lib.ModelConfig.from_dict(c.model))
  total_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  assert one["num_params"] == fsdp["num_params"] == sum(x.size for x in jax.tree.leaves(abstract))
  assert one["params"] == total_bytes  # data parallelism replicates
  # FSDP=8 splits every leaf with an 'embed' axis 8 ways; only the RMSNorm scales stay whole.
  norms = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract) if x.ndim == 1)
  assert fsdp["params"] == (total_bytes - norms) // 8 + norms
  # AdamW: mu and nu like the params, plus a few replicated scalar counters.
  assert 2 * fsdp["params"] <= fsdp["optimizer"] <= 2 * fsdp["params"] + 64
  assert fsdp["reference"] == fsdp["params"]
  assert "layers_0/attn/q/kernel" in out and "('fsdp', 'tensor', None)" in out


def test_reference_memory_follows_the_reference_in_the_step():
  free = dry_run.report(config(**{"loss.type": "simpo"}), compile_step=False)
  assert free["reference"] == 0 and free["params"] > 0
  moving = dry_run.report(config(**{"ref_update.mode": "soft"}), compile_step=False)
  assert moving["reference"] == 2 * moving["params"]  # the original pi_ref and the TR-DPO moving copy


def test_step_temporaries_shrink_with_chunked_logprobs():
  # A vocab much wider than the model: the [2B, T, V] fp32 logits dominate the naive step.
  big_vocab = {"model.vocab_size": 8192, "batch_size": 8, "max_length": 128, "max_prompt_length": 64}
  naive = dry_run.report(config(**big_vocab), compile_step=True)
  chunked = dry_run.report(config(**big_vocab, **{"model.logits_chunk_size": "16"}), compile_step=True)
  logits_bytes = 2 * 8 * 128 * 8192 * 4 // jax.device_count()  # per device: the batch is split over all of them
  assert naive["activations"] > logits_bytes, naive
  assert chunked["activations"] < naive["activations"] - logits_bytes / 2, (naive, chunked)
  assert naive["total"] == naive["params"] + naive["optimizer"] + naive["reference"] + naive["activations"]


def test_packed_batches_compile_in_the_dry_run():
  packed = dry_run.report(config(**{"data.packing": True, "data.pairs_per_row": 1}), compile_step=True)
  assert packed["activations"] > 0


def test_train_dry_run_flag_prints_tables_and_runs_no_step(tmp_path):
  env = with_emulated_devices(4, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  out = subprocess.run(
      [sys.executable, "-m", "dpo_jax.train", "--dry_run", "--config", "configs/default.py:tiny",
       "--config.mesh.fsdp=2", "--config.mesh.data=2", "--workdir", str(tmp_path / "w")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "per-device memory of the DPO stage" in out.stdout
  assert "'data': 2, 'fsdp': 2" in out.stdout
  assert not os.path.exists(tmp_path / "w"), "a dry run must not write a workdir"


@pytest.mark.slow
def test_a_sequence_axis_divides_the_step_temporaries_and_says_when_only_it_fits(capsys):
  """max_length 512 over mesh.sequence=4: the attention and MLP temporaries shrink with the shards; a capacity
  between the two totals is reported as fitting only with the sequence axis."""
  long = {"max_length": 512, "max_prompt_length": 64, "batch_size": 2, "mesh.data": 2, "mesh.sequence": 4,
          "model.attention_impl": "xla"}
  cp = dry_run.report(config(**long), compile_step=True)
  without = cp["without_sequence"]
  assert without["sequence"] == 4
  assert without["activations"] > 2.5 * cp["activations"], (cp, without)
  capacity = (cp["total"] + without["total"]) / 2 / 1024 ** 3
  fitted = dry_run.report(config(**long, **{"perf.device_memory_gib": capacity}), compile_step=True)
  out = capsys.readouterr().out
  assert fitted["fits"] and not fitted["fits_without_sequence"]
  assert "this config only fits with mesh.sequence > 1" in out
  assert "context parallelism: step temporaries per device" in out


def test_remat_auto_takes_full_only_when_the_activations_crowd_the_device(capsys):
  """`model.remat='auto'`: 'none' when the estimated saved activations fit in half the memory left on a device,
  'full' when they do not; an explicit setting is kept; the dry run prints the estimate behind the choice."""
  from dpo_jax.train import runtime
  c = config(**{"model.remat": "auto", "max_length": 128, "max_prompt_length": 64})
  assert runtime.model_config(c, devices=8, device_bytes=64 * 2 ** 30).remat == "none"
  assert runtime.model_config(c, devices=8, device_bytes=2 ** 20).remat == "full"
  remat, why = runtime.resolve_remat(c, runtime.model_config(c), devices=8, device_bytes=2 ** 20)
  assert remat == "full" and "GiB of saved activations per device > half of the" in why, why
  assert runtime.model_config(config(**{"model.remat": "dots_saveable"}), devices=8,
                              device_bytes=2 ** 20).remat == "dots_saveable"
  dry_run.report(c, compile_step=False)
  assert "remat: 'auto': 'none'" in capsys.readouterr().out
