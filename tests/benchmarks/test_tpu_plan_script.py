"""scripts/tpu_plan.py: its plans are the trainer configs the README's table describes, and --smoke compiles one."""

import importlib.util
import os

import pytest
from paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("tpu_plan_script", os.path.join(REPO_ROOT, "scripts", "tpu_plan.py"))
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def test_plans_shard_over_the_slice_with_one_pair_per_chip_or_per_sequence_group():
  c = script.plan_config("8B", 2048, "full", 256)
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.batch_size) == (1, 256, 1, 256)
  assert c.model.hidden_size == 4096 and c.model.num_kv_heads == 8 and c.model.remat == "full"
  assert c.model.compute_dtype == "bfloat16" and c.model.scan_layers and c.model.logits_chunk_size == "1024"
  long = script.plan_config("1B", 32768, "none", 32)
  assert (long.mesh.fsdp, long.mesh.sequence, long.batch_size, long.max_prompt_length) == (4, 8, 4, 16384)


@pytest.mark.slow  # one 1B compile for 32 chips: ~30 s
def test_smoke_prints_a_fitting_row(capsys):
  script.main(["--smoke"])
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| 1B | v5p-64 |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[2] == "fsdp=32" and cells[3] == "2048" and cells[4] == "32" and cells[6] == "yes", cells
  assert 0 < float(cells[7]) < 95 and cells[14].endswith("%")
