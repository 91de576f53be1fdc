"""scripts/context_parallel.py: its HLO byte count (collectives times loop trip counts) and the analytic count it is
compared with agree, so the README's communication table reads what the program sends."""

import importlib.util
import os

import jax
import pytest
from paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("context_parallel_script",
                                              os.path.join(REPO_ROOT, "scripts", "context_parallel.py"))
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

# A hand-written optimized-HLO module: one permute in the entry, one in a while body of 3 trips, an all-gather in a
# body called once, an all-reduce at the top level.
HLO = """HloModule m

%body (p: (f32[4,8])) -> (f32[4,8]) {
  %g = f32[4,8]{1,0} get-tuple-element(%p), index=0
  %ppermute.2 = f32[4,8]{1,0} collective-permute(%g), channel_id=2, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (f32[4,8]{1,0}) tuple(%ppermute.2)
}

%cond (p: (f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%inner (x: bf16[2,16]) -> bf16[4,16] {
  ROOT %all-gather = bf16[4,16]{1,0} all-gather(%x), channel_id=3, replica_groups={{0,1}}, dimensions={0}
}

ENTRY %main (a: f32[4,8], b: bf16[2,16]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %ppermute.1 = f32[4,8]{1,0} collective-permute(%a), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %t = (f32[4,8]{1,0}) tuple(%ppermute.1)
  %w = (f32[4,8]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %c = bf16[4,16]{1,0} call(%b), to_apply=%inner
  ROOT %all-reduce.1 = f32[4,8]{1,0} all-reduce(%a), channel_id=4, replica_groups={{0,1}}, to_apply=%cond
}
"""


def test_collective_bytes_count_each_loop_trip():
  sent = script.collective_bytes(HLO, n=2)
  assert sent["collective-permute"] == 4 * 8 * 4 * (1 + 3)  # one at the top, one per trip
  assert sent["all-gather"] == 4 * 16 * 2 / 2  # half the gathered result came from the other device
  assert sent["all-reduce"] == 2 * 4 * 8 * 4 / 2


@pytest.mark.parametrize("mode", ["ring", "all_gather"])
@pytest.mark.slow
def test_the_measured_attention_bytes_equal_the_analytic_count(mode):
  """sequence=4, 256 tokens: the compiled step's attention collectives are the hand count (within the
  all_gather mode's folded index gather) and the loss equals the unsharded step's."""
  cfg = script.model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2, attention_impl="xla", context_parallel=mode)
  batch = script.one_pair(256, cfg.vocab_size)
  sharded = script.measure(cfg, 4, batch, repeats=1)
  plain = script.measure(cfg, 1, batch, repeats=1)
  analytic = script.analytic_attention_bytes(mode, 4, 2, 256, cfg)
  assert sharded["attention"] == pytest.approx(analytic, rel=1e-9 if mode == "ring" else 0.01), sharded
  assert sharded["other"] > 0  # the weight gradients' all-reduce over the sequence axis
  assert plain["attention"] == plain["other"] == 0
  assert sharded["temp"] < plain["temp"]
  assert sharded["value"] == pytest.approx(plain["value"], rel=1e-5)
  assert jax.device_count() == 8
