"""benchmarks/ablation_grid.py: both arms' configs are valid for every variant and differ only in the cache.
The grid itself is `run_ablation`, run end to end by tests/experiments/test_notebook.py."""

import argparse
import importlib.util
import os

import jax

from paths import REPO_ROOT

from dpo_jax.experiments import ablation
from dpo_jax.train import config_checks


def _bench():
  spec = importlib.util.spec_from_file_location("_ablation_grid_bench",
                                                os.path.join(REPO_ROOT, "benchmarks", "ablation_grid.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


def test_arms_are_valid_and_differ_only_in_the_cache(tmp_path):
  bench = _bench()
  assert len(bench.VARIANTS) >= 8 and len({v["name"] for v in bench.VARIANTS}) == len(bench.VARIANTS)
  for model in bench.MODELS:
    args = argparse.Namespace(model=model, smoke=False, steps=0, num_prompts=16)
    configs = {}
    for arm in ("cache", "nocache"):
      work = tmp_path / model / arm
      work.mkdir(parents=True)
      configs[arm] = bench.grid_config(args, arm, str(work))
      base = ablation.ablation_config(configs[arm])
      for variant in bench.VARIANTS:  # every field a variant sets is a real config field with a valid value
        config_checks.validate_config(ablation.variant_config(base, variant), jax.device_count())
    cache, nocache = (configs[a].to_dict() for a in ("cache", "nocache"))
    assert (cache.pop("reference_cache"), nocache.pop("reference_cache")) == ("on", "off")
    for c in (cache, nocache):
      c.pop("reference_cache_dir")
      c["data"].pop("train"), c["data"].pop("test")
    assert cache == nocache
    assert configs["cache"].perf.compile_cache == ""  # neither arm reads the other's compiled programs
