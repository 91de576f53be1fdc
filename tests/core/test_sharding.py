"""Meshes from config, logical rules -> PartitionSpecs, and clear errors instead of silent replication."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.default import SHARDING_RULES
from dpo_jax import sharding


def test_mesh_shape_resolves_minus_one():
  # (data, fsdp, expert, sequence, tensor)
  assert sharding.resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1, 1, 1)
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 1, 1, 2)
  assert sharding.resolve_mesh_shape({"data": 1, "fsdp": -1}, 4) == (1, 4, 1, 1, 1)
  assert sharding.resolve_mesh_shape({"data": -1, "sequence": 4}, 8) == (2, 1, 1, 4, 1)
  assert sharding.resolve_mesh_shape({"data": 1, "expert": 4, "fsdp": -1}, 8) == (1, 2, 4, 1, 1)


@pytest.mark.parametrize("sizes,match", [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": 3}, "cannot be split"),
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"model": 2}, "unknown axes"),
])
def test_mesh_errors(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.resolve_mesh_shape(sizes, 8)


def test_make_mesh_uses_the_devices_given():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
  one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  assert one.devices.size == 1


def test_rules_map_logical_axes():
  assert sharding.logical_to_spec(("embed", "mlp"), SHARDING_RULES) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), SHARDING_RULES) == P(None, "fsdp", "tensor", None)
  assert sharding.logical_to_spec(("batch", "length", "act_embed"), SHARDING_RULES) == P(("data", "fsdp", "expert"), "sequence", None)
  with pytest.raises(ValueError, match="no rule for logical axis 'experts'"):
    sharding.logical_to_spec(("experts",), SHARDING_RULES)
  with pytest.raises(ValueError, match="twice"):
    sharding.logical_to_spec(("heads", "mlp"), SHARDING_RULES)


def test_indivisible_dimension_is_an_error_not_a_silent_replicate():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  s = sharding.named_sharding(mesh, SHARDING_RULES, ("embed", "mlp"), (8, 6), what="w")
  assert s.spec == P("fsdp", "tensor")
  with pytest.raises(ValueError, match="w has shape .* not divisible by the 2 devices"):
    sharding.named_sharding(mesh, SHARDING_RULES, ("embed", "mlp"), (8, 5), what="w")


def test_global_batch_is_sharded_over_data_and_fsdp():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  local = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3), "pair_mask": np.ones(4, np.int32)}
  batch = sharding.global_batch(mesh, SHARDING_RULES, local)
  assert batch["input_ids"].sharding.spec == P(("data", "fsdp", "expert"), None)
  assert {s.data.shape for s in batch["input_ids"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])
