"""The TPU dry run: the run's steps AOT-compiled by libtpu for TPU topologies on this CPU host (no TPU).

Each compile of the tiny model takes a few seconds. libtpu comes with the test extra (`pip install -e '.[test]'`),
so these tests run in CI; they fail, not skip, where it is missing."""

import dataclasses
import functools
import subprocess
import sys

import jax
import pytest

from config_overrides import override
from configs.default import get_config
from dpo_jax import model as model_lib, optim, platforms, sharding, step
from dpo_jax.experiments import sweep
from dpo_jax.train import dry_run, runtime, topology, tpu_dry_run
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices

SPLASH = {"splash_mha_fwd_segmented_residuals", "splash_mha_fwd_segmented_no_residuals",
          "splash_mha_dq_segmented_no_residuals", "splash_mha_dkv_segmented_no_residuals"}


def config(**overrides):
  """The tiny model in bf16 (compute_dtype 'auto' on a TPU), 256-token rows (splash tiles of 128 fit)."""
  c = get_config("tiny")
  return override(c, {"model.compute_dtype": "auto", "max_length": 256, "max_prompt_length": 128,
                      "mesh.data": 2, "mesh.fsdp": 2, **overrides})


def test_libtpu_is_installed():
  assert topology.compiler_available(), "the TPU compiler is missing: pip install -e '.[test]' brings jax[tpu]"


@pytest.fixture(scope="module", params=["v5e:2x2", "v5p:2x2x1"])
def tiny_report(request):
  return tpu_dry_run.report(config(**{"dry_run.topology": request.param}))


@pytest.mark.slow
def test_tiny_steps_compile_for_two_tpu_generations_with_splash_and_no_cpu_path(tiny_report):
  r = tiny_report
  assert r["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
  assert [s.name for s in r["steps"]] == ["dpo", "sft", "eval"]
  kinds = {"v5e": "TPU v5 lite", "v5p": "TPU v5"}
  assert r["topology"].chip.device_kind == kinds[r["topology"].chip.generation]
  for s in r["steps"]:
    assert s.cpu_only == [], f"{s.name} holds a CPU-only path: {s.cpu_only}"
    assert s.attention.startswith("splash")
    assert s.arguments > 0 and s.temporaries > 0 and s.total < r["capacity"]
    assert s.flops > 0 and s.model_flops > 0
  dpo, sft, evaluate = r["steps"]
  assert SPLASH <= set(dpo.kernels), dpo.kernels  # forward, dq and dkv kernels as tpu_custom_calls
  # 2 layers: pi_ref's forward (no residuals), the policy's forward (residuals for the backward), dq and dkv.
  assert dpo.kernels == {k: 2.0 for k in SPLASH}
  assert evaluate.kernels == {"splash_mha_fwd_segmented_no_residuals": 4.0}  # policy and pi_ref, 2 layers each
  assert "splash_mha_fwd_segmented_no_residuals" not in sft.kernels  # SFT holds no reference forward
  # FSDP gathers params (all-gather), data parallelism sums gradients (all-reduce).
  assert dpo.collectives["all-gather"].sent > 0 and dpo.collectives["all-reduce"].sent > 0
  assert r["fits"]
  roof = r["roofline"]["dpo"]
  assert roof["step"] == max(roof["compute"], roof["memory"], roof["ici"]) > 0
  assert 0 < roof["mfu"] <= 1


@pytest.mark.slow
def test_compiler_flops_count_every_layer_of_a_scanned_model():
  """Scanned and unrolled layers compile to the same FLOPs per step (XLA's own count sees one scanned layer);
  with splash the attention leaves XLA's count and is added back from the kernels' executions."""
  common = {"dry_run.topology": "v5e:2x2", "dry_run.steps": ("dpo",), "model.hidden_size": 128,
            "model.intermediate_size": 256, "model.num_layers": 4, "model.attention_impl": "xla"}
  flat = tpu_dry_run.report(config(**common))["steps"][0]
  scanned = tpu_dry_run.report(config(**common, **{"model.scan_layers": True}))["steps"][0]
  splash = tpu_dry_run.report(config(**{**common, "model.scan_layers": True, "model.attention_impl": "auto"}))
  splash = splash["steps"][0]
  assert scanned.flops == pytest.approx(flat.flops, rel=0.02)
  assert 0.9 < flat.flops / flat.model_flops < 1.5  # model FLOPs, XLA's full [T, T] scores, norms, the optimizer
  # XLA's attention scores the whole square, splash the causal triangle: what leaves XLA's count with splash is
  # about twice the kernels' count.
  assert splash.flops < scanned.flops and splash.kernel_flops > 0
  assert 1.6 < (scanned.flops - splash.flops) / splash.kernel_flops < 2.4


def test_the_cpu_program_holds_the_cpu_only_paths_the_tpu_program_lacks():
  """The positive control of the check above: built for CPU, the same step has both CPU-only scopes."""
  c = config()
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:4])
  report = tpu_dry_run.compile_steps(c, mesh, runtime.model_config(c, platform="cpu"), ("dpo",))[0]
  assert set(report.cpu_only) == set(platforms.CPU_ONLY_SCOPES)
  assert report.kernels == {}


@pytest.mark.parametrize("overrides, attention", [
    ({"lora.rank": 4, "lora.targets": ("all-linear",)}, "splash"),
    ({"mesh.fsdp": 1, "mesh.sequence": 2, "model.context_parallel": "ring"}, "context-parallel 'ring'"),
    ({"mesh.fsdp": 1, "mesh.sequence": 2, "model.context_parallel": "all_gather"}, "splash (Pallas TPU) on all-"),
])
@pytest.mark.slow
def test_lora_and_context_parallel_steps_compile(overrides, attention):
  r = tpu_dry_run.report(config(**{"dry_run.topology": "v5e:2x2", "dry_run.steps": ("dpo",), **overrides}))
  (dpo,) = r["steps"]
  assert dpo.attention.startswith(attention), dpo.attention
  assert dpo.cpu_only == []
  if "lora.rank" in overrides:
    assert dpo.name == "dpo (LoRA r=4)"
  else:  # the ring passes K/V blocks (collective-permute); all_gather gathers them and reduce-scatters dK/dV
    kind = "collective-permute" if overrides["model.context_parallel"] == "ring" else "reduce-scatter"
    assert dpo.collectives[kind].sent > 0


@pytest.mark.slow
def test_a_vmapped_sweep_compiles_for_a_tpu():
  c = config()
  topo = topology.parse("v5p:2x2x1")
  mesh = sharding.make_mesh(c.mesh, topology.devices(topo))
  rules = tuple(tuple(r) for r in c.sharding.rules)
  model_cfg = runtime.model_config(c, platform="tpu")
  model = model_lib.make_model(model_cfg, sharding.ShardingContext(mesh, rules))
  optimizer, schedule = optim.make_optimizer(c.optim)
  state_sh = step.state_shardings(model_cfg, optimizer, mesh, rules)
  params = model_lib.abstract_params(model_cfg)
  batch, batch_sh = tpu_dry_run.rows_batch(2 * c.batch_size, c.max_length, c.batch_size, mesh, rules)
  fn = sweep.jit_sweep_step(
      sweep.make_sweep_step(model, optimizer, schedule, c.loss, (0.05, 0.1, 0.5), shard=sharding.ShardingContext(
          mesh, rules)), state_shardings=state_sh, reference_shardings=state_sh.params, batch_shardings=batch_sh,
      mesh=mesh)
  stacked_sh = sweep.stacked_shardings(state_sh, mesh)
  state = jax.eval_shape(lambda p: sweep.stack_states(step.create_train_state(p, optimizer), 3), params)
  abstract = dry_run.with_shardings
  compiled = fn.lower(abstract(state, stacked_sh), abstract(params, state_sh.params), abstract(batch, batch_sh)).compile()
  report = tpu_dry_run.analyse("sweep", compiled, 0.0, cfg=model_cfg, batch=batch, mesh=mesh, model_flops=1.0)
  assert SPLASH <= set(report.kernels) and report.cpu_only == []


@pytest.mark.slow
def test_a_shared_prompt_step_compiles_with_splash_on_the_prompt_offset_mask():
  """Shared prompts `[B, P]` + responses `[2B, R]` (the trainer's 'dpo_shared' layout): the responses attend their
  prompt through splash's causal mask offset by P, a second kernel shape in the same step."""
  c = config()
  mesh = sharding.make_mesh(c.mesh, topology.devices(topology.parse("v5e:2x2")))
  rules = tuple(tuple(r) for r in c.sharding.rules)
  model_cfg = runtime.model_config(c, platform="tpu")
  shard = sharding.ShardingContext(mesh, rules)
  optimizer, schedule = optim.make_optimizer(c.optim)
  state_sh = step.state_shardings(model_cfg, optimizer, mesh, rules)
  pairs, p, r = c.batch_size, 128, 128
  shapes = {"prompt_ids": (pairs, p), "prompt_mask": (pairs, p), "prompt_positions": (pairs, p),
            "input_ids": (2 * pairs, r), "attention_mask": (2 * pairs, r), "positions": (2 * pairs, r),
            "loss_mask": (2 * pairs, r), "pair_mask": (pairs,)}
  batch = {k: jax.ShapeDtypeStruct(v, jax.numpy.int32) for k, v in shapes.items()}
  batch_sh = sharding.batch_shardings(mesh, rules, batch)
  fn = step.jit_train_step(
      functools.partial(step.train_step, model=model_lib.make_model(model_cfg, shard), optimizer=optimizer,
                        schedule=schedule, loss_cfg=c.loss, shard=shard),
      state_shardings=state_sh, reference_shardings=state_sh.params, batch_shardings=batch_sh, mesh=mesh)
  params = model_lib.abstract_params(model_cfg)
  state = jax.eval_shape(lambda q: step.create_train_state(q, optimizer), params)
  abstract = dry_run.with_shardings
  compiled = fn.lower(abstract(state, state_sh), abstract(params, state_sh.params), abstract(batch, batch_sh)).compile()
  report = tpu_dry_run.analyse("shared", compiled, 0.0, cfg=model_cfg, batch=batch, mesh=mesh, model_flops=1.0)
  assert report.cpu_only == [] and report.attention.startswith("splash")
  # the prompt stream and the response stream each run their own kernels: twice the row layout's count
  assert report.kernels["splash_mha_fwd_segmented_no_residuals"] == 4.0, report.kernels


def test_a_config_too_big_for_the_chip_is_reported_as_not_fitting(capsys):
  """254M params and 4 pairs of 4096 tokens on one v5e chip: libtpu refuses the program (RESOURCE_EXHAUSTED, ~24 GiB
  of temporaries against 15.75 usable), and the dry run reports that as not fitting, with the compiler's numbers."""
  big = config(**{"dry_run.topology": "v5e-1", "dry_run.steps": ("dpo",), "mesh.data": 1, "mesh.fsdp": 1,
                  "batch_size": 4, "model.vocab_size": 32000, "model.hidden_size": 2048,
                  "model.intermediate_size": 8192, "model.num_layers": 3, "model.num_heads": 16,
                  "model.num_kv_heads": 8, "model.scan_layers": True, "max_length": 4096,
                  "max_prompt_length": 1024, "model.remat": "none", "model.logits_chunk_size": "0"})
  r = tpu_dry_run.report(big)  # (with 'auto' remat and chunking, the defaults, it would be made to fit)
  out = capsys.readouterr().out
  (dpo,) = r["steps"]
  assert not r["fits"] and dpo.total > r["capacity"] == 16 * 1024 ** 3
  assert "exceeds available HBM" in dpo.refused and dpo.temporaries > 16 * 1024 ** 3
  assert dpo.arguments > 4 * 254e6 * 4  # policy and pi_ref fp32, AdamW's two moments
  assert "does NOT fit" in out and "the TPU compiler refused it" in out
  row = next(line for line in out.splitlines() if line.startswith("dpo ")).split()
  assert ">=" in row and "NO" in row, row  # the total is at least the compiler's figure


def test_stage_steps_follow_the_stage():
  assert tpu_dry_run.stage_steps(config()) == ("dpo", "sft", "eval")
  assert tpu_dry_run.stage_steps(config(**{"stage": "dpo"})) == ("dpo", "eval")
  assert tpu_dry_run.stage_steps(config(**{"sft.steps": 0})) == ("dpo", "eval")
  with pytest.raises(ValueError, match="dry_run.steps"):
    tpu_dry_run.stage_steps(config(**{"dry_run.steps": ("dpo", "train")}))


def test_a_mesh_axis_may_split_a_physical_axis():
  """sequence=8 on v6e-256's 16x16 torus: no physical axis is 8 long (jax.make_mesh refused it, found by
  scripts/tpu_plan.py); the mesh now splits one."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 32, "sequence": 8}, topology.devices(topology.parse("v6e-256")))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "expert": 1, "sequence": 8, "tensor": 1}
  assert len({d.id for d in mesh.devices.flat}) == 256


def test_multislice_mesh_puts_data_across_slices():
  devices = topology.devices(topology.parse("v5e-4", num_slices=2))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, devices)
  assert [{d.slice_index for d in row.flat} for row in mesh.devices.reshape(2, 4)] == [{0}, {1}]
  with pytest.raises(ValueError, match="multiple of 2"):
    sharding.make_mesh({"data": 1, "fsdp": -1}, devices)


@pytest.mark.parametrize("name, grid, chips", [
    ("v5p-64", (2, 4, 4), 32), ("v5p-8", (2, 2, 1), 4), ("v5p-128", (4, 4, 4), 64), ("v4-32", (2, 2, 4), 16),
    ("v5e-16", (4, 4), 16), ("v5e-8", (2, 4), 8), ("v6e-256", (16, 16), 256), ("v5p:4x4x8", (4, 4, 8), 128),
    ("v5litepod-4", (2, 2), 4)])
def test_topology_names(name, grid, chips):
  topo = topology.parse(name)
  assert topo.grid == grid and topo.chips == chips


@pytest.mark.parametrize("bad", ["v3-8", "v5p-6", "v5e:4x4x4", "v6e-512", "tpu", "v5p-"])
def test_bad_topology_names_say_what_is_valid(bad):
  with pytest.raises(ValueError, match="dry_run.topology"):
    topology.parse(bad)


def _cli(*args):
  env = without_emulated_devices(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  return subprocess.run([sys.executable, "-m", "dpo_jax.train", "--config", "configs/default.py:tiny", *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_unknown_topology_is_one_line_naming_the_valid_ones(tmp_path):
  out = _cli("--dry_run", "--config.dry_run.topology=v9z-8", "--workdir", str(tmp_path / "w"))
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: dry_run.topology='v9z-8'"), out.stderr
  assert "v5p-64" in lines[0] and "v6e-256" in lines[0]


def test_cli_topology_without_dry_run_is_refused(tmp_path):
  out = _cli("--config.dry_run.topology=v5p-8", "--workdir", str(tmp_path / "w"))
  assert out.returncode == 2 and "add --dry_run" in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_dry_run_for_a_topology_prints_the_tables_quietly(tmp_path):
  out = _cli("--dry_run", "--config.dry_run.topology=v5e-4", "--config.mesh.data=2", "--config.mesh.fsdp=2",
             "--config.max_length=256", "--config.max_prompt_length=128", "--config.dry_run.steps=('dpo',)",
             "--workdir", str(tmp_path / "w"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "TPU dry run: v5e-4 (v5e:2x2: 4 chips of TPU v5 lite, 16 GiB HBM each)" in out.stdout
  assert "per-device memory (GiB) against 16 GiB (v5e HBM)" in out.stdout and "fits: largest step" in out.stdout
  assert "attention splash (Pallas TPU)" in out.stdout
  assert "uses 'xla' instead of 'splash'" not in out.stderr  # the toy-shape init no longer warns
  assert out.stderr.strip() == "", out.stderr[-2000:]  # libtpu's start-up is quiet
  assert not (tmp_path / "w").exists()


def test_init_traces_no_attention_kernel():
  """Params (and LoRA adapters) are traced on 2 dummy tokens, which splash cannot take; an explicit splash model
  still builds its params (before: 'attention_impl='splash': ... multiples of 128, not 2 and 2')."""
  cfg = dataclasses.replace(runtime.model_config(config(), platform="tpu"), attention_impl="splash")
  assert model_lib.count_params(model_lib.abstract_params(cfg)) > 0
  from dpo_jax import lora as lora_lib
  spec = lora_lib.LoraSpec(rank=2, alpha=4.0, targets=("q_proj",))
  assert model_lib.count_params(lora_lib.abstract_adapters(model_lib.make_model(cfg), spec)) > 0
