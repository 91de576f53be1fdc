"""benchmarks/rollout_throughput.py: its written-out model fields. The script itself runs end to end, without
ml_collections as on the GPU image, inside the device check's smoke test (tests/benchmarks/test_device_check.py),
which checks its table."""

import importlib.util
import os

from paths import REPO_ROOT


def test_written_out_model_fields_equal_configs_default():
  """The GPU image has no ml_collections: the script then builds the model from its written-out fields, which must
  be configs/default.py's (default and tiny)."""
  from configs.default import get_config
  from dpo_jax import model as model_lib
  path = os.path.join(REPO_ROOT, "benchmarks", "rollout_throughput.py")
  spec = importlib.util.spec_from_file_location("_rollout_throughput", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  for variant, fields in ((None, bench.DEFAULT_MODEL), ("tiny", bench.TINY_MODEL)):
    assert model_lib.ModelConfig.from_dict(fields) == model_lib.ModelConfig.from_dict(dict(get_config(variant).model)), (
        f"benchmarks/rollout_throughput.py's {variant or 'default'} model fields differ from configs/default.py's")
