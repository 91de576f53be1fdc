"""benchmarks/online_dpo.py: the trainer flags of each method name real config fields and the method's shape.
The stage itself is run end to end by tests/train/test_online.py; the script only chains trainer commands."""

import importlib.util
import os

from paths import REPO_ROOT

from dpo_jax.train import config_checks


def _bench():
  spec = importlib.util.spec_from_file_location("_online_dpo_bench", os.path.join(REPO_ROOT, "benchmarks",
                                                                                    "online_dpo.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


def test_each_method_is_the_trainer_with_its_shape_and_real_fields():
  bench = _bench()
  flags = {m: dict(f.split("=", 1) for f in bench.method_args(m, 400, "synthetic", smoke=False)) for m in bench.METHODS}
  assert flags["offline"] == {"--config.stage": "dpo", "--config.optim.total_steps": "400"}
  online, iterative = flags["online"], flags["iterative"]
  assert (online["--config.online.rounds"], online["--config.online.steps_per_round"],
          online["--config.online.samples_per_prompt"], online["--config.online.keep_pairs"]) == ("400", "1", "2",
                                                                                                 "False")
  assert (iterative["--config.online.rounds"], iterative["--config.online.steps_per_round"],
          iterative["--config.online.samples_per_prompt"], iterative["--config.online.keep_pairs"]) == ("4", "100",
                                                                                                       "8", "True")
  for method in bench.METHODS:  # every flag names a field of configs/default.py (else SystemExit naming it)
    config_checks.check_override_flags(bench.method_args(method, 4, "synthetic", smoke=True))
