"""`--dry_run` for mixture-of-experts models: total against active params, the experts' kernels split over the
'expert' x 'fsdp' mesh axes, the compiled expert-parallel step, and Qwen3-30B-A3B's variant on 64 devices."""

import subprocess
import sys

import jax
import pytest

from configs.default import get_config
from dpo_jax import flops, model as model_lib
from dpo_jax.train import dry_run, runtime
from config_overrides import override
from paths import REPO_ROOT
from subprocess_env import with_emulated_devices

# The tiny model (D = 32, F = 64, 2 layers, vocab 256, tied embeddings) with E = 4 experts of width Fe = 16, k = 2.
MOE = {"model.num_experts": 4, "model.num_experts_per_tok": 2, "model.moe_intermediate_size": 16, "mesh.data": 1}


def config(**overrides):
  return override(get_config("tiny"), {**MOE, **overrides})


def test_moe_dry_run_prints_active_and_total_params_and_shards_experts_over_expert_and_fsdp(capsys):
  ep = dry_run.report(config(**{"mesh.expert": 2, "mesh.fsdp": 4}), compile_step=False)
  out = capsys.readouterr().out
  abstract = model_lib.abstract_params(runtime.model_config(config()))
  leaves = jax.tree.leaves(abstract)
  total = sum(x.size for x in leaves)
  # A token skips E - k = 2 experts of 3 * 32 * 16 params in each of the 2 layers.
  assert ep["num_params"] == total and ep["active_params"] == total - 2 * 2 * 3 * 32 * 16
  assert f"{total:,} params, {total - 6144:,} active (2 of 4 experts in 2 MoE layers)" in out
  # Expert kernels [4, 32, 16] / [4, 16, 32] split 2 ways over experts and 4 over 'embed': 256 floats per device,
  # 3 kernels x 2 layers x 1 KiB.
  assert ep["expert_params"] == 6 * 256 * 4
  experts = 2 * 3 * 4 * 32 * 16 * 4
  norms = sum(x.size * 4 for x in leaves if x.ndim == 1)
  assert ep["params"] == ep["expert_params"] + (total * 4 - experts - norms) // 4 + norms  # the rest over fsdp
  assert "of which experts" in out and "over expert x fsdp x tensor = 8 devices" in out
  assert "('expert', 'fsdp', 'tensor')" in out  # gate / up [E, D, Fe]: ('expert', 'embed', 'mlp')


def test_without_the_expert_axis_each_device_holds_more_experts():
  # fsdp=4 alone holds twice the experts per device of expert 2 x fsdp 4 (6 KiB); data parallelism replicates them.
  no_ep = dry_run.report(config(**{"mesh.data": 2, "mesh.fsdp": 4}), compile_step=False)
  assert no_ep["expert_params"] == 2 * 6 * 256 * 4
  replicated = dry_run.report(config(**{"mesh.data": 8}), compile_step=False)
  assert replicated["expert_params"] == 2 * 3 * 4 * 32 * 16 * 4
  assert replicated["active_params"] == no_ep["active_params"] == replicated["num_params"] - 6144


def test_a_dense_model_prints_no_active_count(capsys):
  out = dry_run.report(override(get_config("tiny"), {"mesh.data": 8}), compile_step=False)
  assert out["active_params"] == out["num_params"] and out["expert_params"] == 0
  assert " active (" not in capsys.readouterr().out


@pytest.mark.slow
def test_the_expert_parallel_step_compiles_in_the_dry_run(capsys):
  ep = dry_run.report(config(**{"mesh.expert": 2, "mesh.fsdp": 4}), compile_step=True)
  assert ep["activations"] > 0
  assert ep["total"] == ep["params"] + ep["optimizer"] + ep["reference"] + ep["activations"]
  assert "XLA:CPU runs jax.lax.ragged_dot as a masked dense product over all 2 local experts" in capsys.readouterr().out


def test_remat_auto_counts_the_dropless_expert_exchange():
  """Each MoE layer keeps R expert rows per token: k on one device, k x mesh.expert with the dropless exchange
  (buffers sized for all of a device's assignments per peer), k x capacity factor, or E for the dense kernel."""
  cfg = runtime.model_config(config())
  assert runtime.moe_rows_per_token(cfg, 1) == 2 and runtime.moe_rows_per_token(cfg, 2) == 4
  import dataclasses
  assert runtime.moe_rows_per_token(dataclasses.replace(cfg, moe_impl="capacity"), 2) == 2 * 1.25
  assert runtime.moe_rows_per_token(dataclasses.replace(cfg, moe_impl="dense"), 2) == 4
  # Qwen3-30B-A3B on 64 v5p chips: ~442 GiB of saved activations (the TPU compiler's step without remat: 451 GiB).
  qwen = get_config("qwen3-30b-a3b")
  remat, why = runtime.resolve_remat(qwen, runtime.model_config(qwen, platform="tpu", devices=64,
                                                                device_bytes=95 * 2 ** 30), 64, 95 * 2 ** 30)
  assert remat == "full" and "~441.75 GiB of saved activations" in why, why


@pytest.mark.slow
def test_qwen3_30b_a3b_on_64_devices_fits_a_v5p_chip_statically():
  """The variant's param, optimizer and pi_ref bytes on the expert 8 x fsdp 8 mesh of 64 emulated devices (static
  shapes only; the step's temporaries come from the TPU compile in docs/moe.md)."""
  code = ("from configs.default import get_config; from dpo_jax.train import dry_run; "
          "print('OUT', dry_run.report(get_config('qwen3-30b-a3b'), compile_step=False))")
  env = with_emulated_devices(64, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  out = run.stdout
  assert "30,532,122,624 params, 3,353,032,704 active (8 of 128 experts in 48 MoE layers)" in out
  assert "mesh {'data': 1, 'fsdp': 8, 'expert': 8, 'sequence': 1, 'tensor': 1} over 64 cpu device(s)" in out
  report = eval(out.split("OUT ", 1)[1])
  experts = 48 * 3 * 128 * 2048 * 768
  norms = 48 * (2 * 2048 + 2 * 128) + 2048  # replicated: input / post-attention norms, q / k norms, final norm
  rest = 30_532_122_624 - experts - norms  # embedding, LM head, attention, routers: over fsdp = 8
  assert report["expert_params"] == experts * 4 // 64 == 1_811_939_328  # fp32 over expert x fsdp = 64: 1.6875 GiB
  assert report["params"] == report["expert_params"] + rest * 4 // 8 + norms * 4 == 2_583_224_320  # 2.406 GiB
  assert report["reference"] == report["params"]
  assert 2 * report["params"] <= report["optimizer"] <= 2 * report["params"] + 64
  assert "remat: 'auto': 'full'" in out
