"""dpo_jax.hlo: loop trip counts, group sizes, collective bytes and XLA's cost with every loop trip counted."""

import jax
import jax.numpy as jnp
import pytest

from dpo_jax import hlo

# A TPU-style module: no known_trip_count, so the trips come from the condition (i < 5, i starting at 1: 4 trips);
# an all-gather over a mesh-form group of 4 in the body, an all-reduce over explicit groups of 2 in the entry.
TPU_STYLE = """HloModule m, num_partitions=8

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (q: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %q = (s32[], f32[8,16]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%j, %one)
  %x = f32[8,16]{1,0} get-tuple-element(%q), index=1
  %slice = f32[2,16]{1,0} slice(%x), slice={[0:2], [0:16]}
  %gathered = f32[8,16]{1,0:T(8,128)} all-gather(%slice), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, use_global_device_ids=true
  ROOT %t = (s32[], f32[8,16]) tuple(%next, %gathered)
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %start = s32[] constant(1)
  %init = (s32[], f32[8,16]) tuple(%start, %a)
  %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
  ROOT %sum = f32[8,16]{1,0} all-reduce(%out), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %z = f32[] add(%x, %y)
}
"""


def test_trip_count_is_read_off_the_condition_and_the_counter_start():
  module = hlo.parse(TPU_STYLE)
  loop = module.entry.find("loop")
  assert loop.opcode == "while"
  assert hlo.trip_count(module, module.entry, loop) == 4  # i = 1, 2, 3, 4 < 5


def test_collectives_use_each_group_size_and_count_each_trip():
  sent = hlo.collectives(TPU_STYLE, default_group=8)
  result = 8 * 16 * 4
  assert sent["all-gather"].count == 4
  assert sent["all-gather"].sent == pytest.approx(4 * result * 3 / 4)  # group of 4 ('axis_1'), 4 trips
  assert sent["all-reduce"].count == 1
  assert sent["all-reduce"].sent == pytest.approx(2 * result * 1 / 2)  # groups of 2


@pytest.mark.parametrize("text, default, size", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", 8, 4),
    ("replica_groups=[2,4]<=[8]", 8, 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", 8, 2),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0','axis_2'}", 16, 8),
    ("replica_groups={}", 8, 8),
    ("source_target_pairs={{0,1}}", 4, 4),
])
def test_group_size_reads_every_spelling(text, default, size):
  assert hlo.group_size(text, default) == size


def test_shape_bytes_reads_tuples_and_tiled_layouts():
  assert hlo.shape_bytes("(f32[2,64]{1,0:T(8,128)}, bf16[4]{0}, pred[])") == 2 * 64 * 4 + 4 * 2 + 1


def test_cost_counts_every_trip_of_a_scan_where_xla_counts_one():
  """A 6-step scan of matmuls: XLA's own cost analysis counts the body once; `hlo.cost` six times, equal to the
  unrolled program's count."""
  w = jnp.ones((6, 128, 128), jnp.float32)
  x = jnp.ones((64, 128), jnp.float32)

  def scanned(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

  def unrolled(w, x):
    for i in range(6):
      x = jnp.tanh(x @ w[i])
    return x

  one_matmul = 2 * 64 * 128 * 128
  loop = jax.jit(scanned).lower(w, x).compile()
  flat = jax.jit(unrolled).lower(w, x).compile()
  assert loop.cost_analysis()["flops"] < 2 * one_matmul  # the body once (the reason `hlo.cost` exists)
  counted = hlo.cost(loop.as_text())
  assert counted["flops"] == pytest.approx(6 * one_matmul, rel=0.01)
  assert counted["flops"] == pytest.approx(hlo.cost(flat.as_text())["flops"], rel=0.01)
  assert counted["transcendentals"] == pytest.approx(6 * 64 * 128, rel=0.01)


def test_kernels_name_custom_call_kernels_and_skip_xla_helpers():
  text = """HloModule m

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %splash_mha_fwd_no_residuals.3 = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config="x"
  %alloc = f32[8]{0} custom-call(), custom_call_target="AllocateBuffer"
  ROOT %fmha = f32[8]{0} custom-call(%a), custom_call_target="__cudnn$fmhaSoftmax"
}
"""
  assert hlo.kernels(text) == {"splash_mha_fwd_no_residuals": 1.0, "__cudnn$fmhaSoftmax": 1.0}


def test_multiline_kernel_metadata_stays_one_instruction():
  text = TPU_STYLE.replace(
      "  ROOT %t = (s32[], f32[8,16]) tuple(%next, %gathered)",
      '  %k.1 = f32[8,16]{1,0} custom-call(%gathered), custom_call_target="tpu_custom_call", '
      'frontend_attributes={kernel_metadata={\n"xprof_metadata":"{\\"block_q\\": 128}"\n}}\n'
      "  ROOT %t = (s32[], f32[8,16]) tuple(%next, %k.1)")
  module = hlo.parse(text)
  body = module.computations["body"]
  assert [i.opcode for i in body.instructions][-2:] == ["custom-call", "tuple"]
  assert hlo.kernels(module) == {"k": 4.0}
  assert len(body.instructions) == 9  # the 8 of TPU_STYLE's body and the kernel, whose metadata spans 3 lines
