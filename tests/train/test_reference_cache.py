"""The reference log-prob cache (dpo_jax/train/reference_cache.py): what its key sees, that an entry serves
exactly pi_ref's log-probs, that a damaged or half-written entry is never served, and that any host count
reuses what another wrote.

Run as a script (`python tests/train/test_reference_cache.py worker ...`) it is one process of the multi-host
test: jax.distributed over 127.0.0.1, 4 CPU devices each.
"""

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from config_overrides import override
from configs.default import get_config
from dpo_jax import sharding
from dpo_jax.data import synthetic
from dpo_jax.train import config_checks, pipeline, reference_cache, runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_TRAIN, N_TEST = 20, 12  # eval batches of 8: the last of each split is padded


def write_data(directory):
  """The embedded task's first N_TRAIN / N_TEST rows as two jsonl files -> their directory."""
  os.makedirs(directory, exist_ok=True)
  for split, path, n in (("train", synthetic.train_path(), N_TRAIN), ("test", synthetic.test_path(), N_TEST)):
    with open(path) as f, open(os.path.join(directory, f"{split}.jsonl"), "w") as out:
      out.writelines(f.readline() for _ in range(n))
  return directory


def make_config(data_dir, cache_dir, **overrides):
  c = get_config("tiny")
  c.data.train, c.data.test = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "test.jsonl")
  c.eval.batch_size = 8
  c.reference_cache_dir = str(cache_dir)
  c.progress_bar = False
  c.eval.num_prompts = 0
  return override(c, overrides)


def build(config, workdir):
  """(rt, pi_ref params (the seeded init), train, test) of `config`."""
  tokenizer = runtime.load_tokenizer(config.data.tokenizer)
  train, test, _, _ = runtime.load_pairs(config, tokenizer)
  rt = runtime.build_runtime(config, str(workdir), len(tokenizer))
  return rt, runtime.initial_params(rt), train, test


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  data = write_data(str(tmp_path_factory.mktemp("data")))
  config = make_config(data, tmp_path_factory.mktemp("cache"))
  rt, params, train, test = build(config, tmp_path_factory.mktemp("wd"))
  return dict(data=data, config=config, rt=rt, params=params, train=train, test=test)


# ---- the params' fingerprint ----

def np_fmix32(h):
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def np_leaf_sums(x, leaf):
  """The module docstring's formula in numpy: sum_i fmix32(bits_i * (fmix32(i * golden + leaf * c + salt) | 1))."""
  x = np.asarray(x)
  bits = (x.view(np.uint16).astype(np.uint32) if x.dtype.itemsize == 2 else x.view(np.uint32)).reshape(-1)
  i = np.arange(bits.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    out = []
    for salt in (0x243F6A88, 0xB7E15162):
      mixer = np_fmix32(i * np.uint32(0x9E3779B1) + np.uint32((leaf * 0x27D4EB2F + salt) % 2 ** 32)) | np.uint32(1)
      out.append(int(np.sum(np_fmix32(bits * mixer), dtype=np.uint64) % 2 ** 32))
  return out


def test_fingerprint_is_the_formula_on_any_sharding_and_sees_one_ulp():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
  fsdp = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  rng = np.random.default_rng(0)
  host = {"a": rng.normal(size=(16, 24)).astype(np.float32), "b": {"c": rng.normal(size=(8, 3)).astype(np.float32)}}
  for dtype in (np.float32, jax.numpy.bfloat16):
    tree = jax.tree.map(lambda x: x.astype(dtype), host)
    sharded = jax.tree.map(lambda x: jax.device_put(x, fsdp), tree)  # each device holds 1/8 of every leaf
    one_device = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), tree)
    assert sharded["a"].sharding.shard_shape((16, 24)) == (2, 24)
    fp = reference_cache.fingerprint_params(sharded)
    assert reference_cache.fingerprint_params(one_device) == fp == reference_cache.fingerprint_params(tree)
    # the device sums are the formula, computed here on the host for each leaf (leaves in tree order: a, b.c)
    sums = np.stack([reference_cache._sums_fn(None)(x, np.uint32(k)) for k, x in enumerate(jax.tree.leaves(sharded))])
    assert sums.tolist() == [np_leaf_sums(x, k) for k, x in enumerate(jax.tree.leaves(tree))]
    bumped = jax.tree.map(lambda x: x.copy(), tree)
    bumped["b"]["c"].view(np.uint32 if dtype == np.float32 else np.uint16)[5, 1] += 1  # the next float: one ulp
    assert bumped["b"]["c"][5, 1] != tree["b"]["c"][5, 1]
    assert reference_cache.fingerprint_params(jax.tree.map(lambda x: jax.device_put(x, fsdp), bumped)) != fp
    swapped = {"a": tree["a"][::-1].copy(), "b": tree["b"]}  # the same values in other places
    assert reference_cache.fingerprint_params(swapped) != fp
  assert (reference_cache.fingerprint_params(host) !=
          reference_cache.fingerprint_params(jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), host)))


# ---- the key ----

def test_the_key_changes_with_each_input_and_only_then(setup, tmp_path):
  config, rt, params, train, test = (setup[k] for k in ("config", "rt", "params", "train", "test"))
  key = lambda c=config, cfg=rt.model_cfg, p=params, tr=train, te=test: reference_cache.cache_key(
      reference_cache.key_parts(c, cfg, p, tr, te))
  base = key()

  # the same inputs built again: the same key
  rt2, params2, train2, test2 = build(make_config(setup["data"], tmp_path / "other_cache"), tmp_path / "wd")
  assert key(p=params2, tr=train2, te=test2) == base
  # fields that change only speed or memory: the same key
  assert key(cfg=dataclasses.replace(rt.model_cfg, remat="full", logits_chunk_size=4, scan_layers=True)) == base

  def edited(**fields):
    return override(config.copy_and_resolve_references(), fields)

  path, leaf = jax.tree_util.tree_leaves_with_path(params)[-1]
  bumped = np.asarray(leaf).copy()
  bumped.view(np.uint32).reshape(-1)[7] += 1  # one element, one ulp
  one_ulp = jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(bumped, x.sharding) if p == path else x,
                                             params)

  token = list(train.prompt_ids)
  token[3] = token[3].copy()
  token[3][-1] = (token[3][-1] + 1) % 200
  tokenizer = runtime.load_tokenizer("")
  longer = runtime.load_pairs(edited(max_length=40), tokenizer)[0]

  with open(config.data.train) as f:
    rows = [json.loads(line) for line in f]
  rows[0]["note"] = "a column the pairs do not use"
  extra_column = tmp_path / "train.jsonl"
  extra_column.write_text("".join(json.dumps(r) + "\n" for r in rows))
  same_tokens = runtime.load_pairs(edited(**{"data.train": str(extra_column)}), tokenizer)[0]
  assert reference_cache.tokens_sha256(same_tokens) == reference_cache.tokens_sha256(train)

  ld = edited()
  ld.loss.ld_alpha = 0.5
  variants = {
      "params one ulp": key(p=one_ulp),
      "a token": key(tr=dataclasses.replace(train, prompt_ids=tuple(token))),
      "max_length": key(c=edited(max_length=40), tr=longer),
      "data file bytes": key(c=edited(**{"data.train": str(extra_column)}), tr=same_tokens),
      "prompt sharing": key(c=edited(**{"data.prompt_sharing": "off"})),
      "compute dtype": key(cfg=dataclasses.replace(rt.model_cfg, compute_dtype="bfloat16")),
      "attention kernel": key(cfg=dataclasses.replace(rt.model_cfg, attention_impl="xla")),
      "ld_alpha": key(c=ld),
      "labels (unpaired data)": key(tr=dataclasses.replace(train, labels=np.arange(train.num_pairs) % 2 == 0)),
  }
  assert reference_cache.key_parts(config, rt.model_cfg, params, train, test)["layout"]["train"] == "dpo_shared"
  same = [name for name, k in variants.items() if k == base]
  assert not same, f"the key did not change with: {same}"
  assert len(set(variants.values())) == len(variants)


def test_when_the_cache_applies(setup):
  config, train, test = setup["config"], setup["train"], setup["test"]

  def with_(**fields):
    return override(config.copy_and_resolve_references(), fields)

  assert reference_cache.why_off(config, train) is None
  assert "'off'" in reference_cache.why_off(with_(reference_cache="off"), train)
  assert "stage='sft'" in reference_cache.why_off(with_(stage="sft"), train)
  assert "reference-free" in reference_cache.why_off(with_(**{"loss.type": "simpo"}), train)
  assert "moves pi_ref" in reference_cache.why_off(with_(**{"ref_update.mode": "soft"}), train)
  assert "reference_logps=True" in reference_cache.why_off(with_(**{"data.reference_logps": True}), train)
  # 'auto' computes when the run would score at least the 20 + 12 pairs itself: steps x batch + in-loop evals x 12
  compute = lambda **f: reference_cache.why_not_compute(with_(**f), train, test)
  assert compute(**{"optim.total_steps": 4, "batch_size": 8, "eval.every_steps": 0}) is None  # 32 >= 32
  assert "(24 < 32 train + test pairs" in compute(**{"optim.total_steps": 3, "batch_size": 8, "eval.every_steps": 0})
  assert compute(**{"optim.total_steps": 2, "batch_size": 8, "eval.every_steps": 1}) is None  # 16 + 2 x 12
  assert compute(reference_cache="on", **{"optim.total_steps": 1}) is None
  with pytest.raises(ValueError, match=r"config.reference_cache='sometimes'; choose one of"):
    config_checks.validate_config(with_(reference_cache="sometimes"), 8)
  c = with_()
  with c.ignore_type():
    c.reference_cache_dir = 3
  with pytest.raises(ValueError, match=r"config.reference_cache_dir=3 must be a folder path"):
    config_checks.validate_config(c, 8)


def test_cache_dir_is_the_field_else_the_environment_else_home(setup, monkeypatch):
  c = setup["config"].copy_and_resolve_references()
  assert reference_cache.cache_dir(c) == c.reference_cache_dir
  c.reference_cache_dir = ""
  monkeypatch.setenv(reference_cache.ENV_DIR, "/tmp/somewhere")
  assert reference_cache.cache_dir(c) == "/tmp/somewhere"
  monkeypatch.delenv(reference_cache.ENV_DIR)
  assert reference_cache.cache_dir(c) == os.path.expanduser("~/.cache/dpo_jax/reference_logps")


# ---- entries ----

def fresh(setup, tmp_path):
  """A runtime whose cache folder is `tmp_path` (the module's compiled functions kept)."""
  config = setup["config"].copy_and_resolve_references()
  config.reference_cache_dir = str(tmp_path)
  return dataclasses.replace(setup["rt"], config=config)


def test_a_miss_computes_pi_refs_log_probs_and_a_hit_reads_them_back(setup, tmp_path):
  rt, params, train, test = fresh(setup, tmp_path), setup["params"], setup["train"], setup["test"]
  t1, s1, info = reference_cache.attach(rt, params, train, test)
  assert info.startswith("miss (no entry): computed pi_ref's log-probs of 20 train + 12 test pairs"), info
  assert train.reference_logps is None  # copies: the arguments are not modified
  # pi_ref's log-probs as the precompute stage computes them (one process: its whole batch, in order)
  for split, tokenized, got in (("train", train, t1), ("test", test, s1)):
    want = pipeline.reference_logps(rt, params, tokenized)
    assert got.reference_logps.shape == (tokenized.num_pairs, 2) and got.reference_logps.dtype == np.float64
    np.testing.assert_allclose(got.reference_logps, want, rtol=1e-6, err_msg=split)
    assert np.all(got.reference_logps < 0)
  t2, s2, info = reference_cache.attach(rt, params, train, test)
  key = reference_cache.cache_key(reference_cache.key_parts(rt.config, rt.model_cfg, params, train, test))
  assert info == f"hit {tmp_path / key}"
  assert np.array_equal(t2.reference_logps, t1.reference_logps)
  assert np.array_equal(s2.reference_logps, s1.reference_logps)
  (entry,) = [d for d in os.listdir(tmp_path)]
  assert sorted(os.listdir(tmp_path / entry)) == ["manifest.json", "rows-0-of-1.npz"]
  manifest = json.loads((tmp_path / entry / "manifest.json").read_text())
  assert manifest["key"] == entry and manifest["rows"] == {"train": 20, "test": 12}
  assert manifest["config"]["max_length"] == 32 and manifest["parts"]["layout"] == {"train": "dpo_shared",
                                                                                   "test": "dpo_shared"}
  # the batches carry them: DPO steps read them instead of running pi_ref
  from dpo_jax.data import preference
  batch = preference.make_batch(t2, np.array([3, 19]), kind="dpo")
  np.testing.assert_array_equal(batch["ref_chosen_logps"], t1.reference_logps[[3, 19], 0].astype(np.float32))


def test_ld_dpo_entries_hold_what_the_step_would_score(setup, tmp_path):
  """With config.loss.ld_alpha the entry holds LD-DPO's front + alpha * tail of pi_ref, as the in-step reference."""
  from dpo_jax import step
  from dpo_jax.data import preference
  rt, params, train, test = fresh(setup, tmp_path), setup["params"], setup["train"], setup["test"]
  rt.config.loss.ld_alpha = 0.5
  t, _, info = reference_cache.attach(rt, params, train, test)
  assert info.startswith("miss"), info
  batch = rt.to_global(preference.make_batch(train, np.arange(24) % 20, kind="dpo"))  # rows, not shared prompts
  want = np.asarray(step.reference_logps(rt.plain_model, params, {k: v for k, v in batch.items() if k != "row_ids"},
                                         ld_alpha=0.5))[:20]
  np.testing.assert_allclose(t.reference_logps, want, rtol=1e-5)
  plain = np.asarray(step.reference_logps(rt.plain_model, params, batch, ld_alpha=None))[:20]
  assert np.all(t.reference_logps >= plain - 1e-4) and np.any(t.reference_logps > plain + 1e-3)  # tails halved


def _rewrite_rows(entry, drop_one):
  """Drop the first train row from the entry's rows file, with a manifest that matches the new bytes."""
  path = os.path.join(entry, "rows-0-of-1.npz")
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["train_index"], arrays["train_logps"] = arrays["train_index"][drop_one:], arrays["train_logps"][drop_one:]
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  with open(path, "wb") as f:
    f.write(buffer.getvalue())
  manifest_path = os.path.join(entry, "manifest.json")
  manifest = json.load(open(manifest_path))
  manifest["files"]["rows-0-of-1.npz"]["sha256"] = reference_cache._sha256(buffer.getvalue())
  json.dump(manifest, open(manifest_path, "w"))


def _flip_byte(path, offset):
  data = bytearray(open(path, "rb").read())
  data[offset] ^= 0x01
  open(path, "wb").write(bytes(data))


DAMAGE = {
    "truncated rows": (lambda e: open(os.path.join(e, "rows-0-of-1.npz"), "r+b").truncate(100),
                       "rows-0-of-1.npz does not match its SHA-256"),
    "one flipped byte": (lambda e: _flip_byte(os.path.join(e, "rows-0-of-1.npz"), -200),
                         "rows-0-of-1.npz does not match its SHA-256"),
    "missing manifest": (lambda e: os.remove(os.path.join(e, "manifest.json")), "no manifest.json"),
    "missing rows file": (lambda e: os.remove(os.path.join(e, "rows-0-of-1.npz")), "rows-0-of-1.npz is missing"),
    "a missing row": (lambda e: _rewrite_rows(e, 1), "the train rows do not cover its 20 pairs exactly once"),
    "a garbled manifest": (lambda e: open(os.path.join(e, "manifest.json"), "w").write("{not json"),
                           "manifest.json unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_never_served_and_is_rebuilt(setup, tmp_path, damage):
  rt, params, train, test = fresh(setup, tmp_path), setup["params"], setup["train"], setup["test"]
  good, _, _ = reference_cache.attach(rt, params, train, test)
  key = reference_cache.cache_key(reference_cache.key_parts(rt.config, rt.model_cfg, params, train, test))
  sizes = {"train": 20, "test": 12}
  assert reference_cache.load(str(tmp_path), key, sizes) is not None
  apply, why = DAMAGE[damage]
  apply(str(tmp_path / key))
  values, reason = reference_cache.read(str(tmp_path), key, sizes)
  assert values is None and why in reason, reason
  again, _, info = reference_cache.attach(rt, params, train, test)
  assert info.startswith(f"miss ({reason}): computed"), info
  np.testing.assert_array_equal(again.reference_logps, good.reference_logps)
  assert sorted(os.listdir(tmp_path)) == [key]  # the damaged entry is gone, no temporary folder is left
  np.testing.assert_array_equal(reference_cache.load(str(tmp_path), key, sizes)["train"], good.reference_logps)


def test_auto_without_an_entry_computes_nothing_when_the_run_is_short(setup, tmp_path):
  rt, params, train, test = fresh(setup, tmp_path), setup["params"], setup["train"], setup["test"]
  why = reference_cache.why_not_compute(rt.config, train, test)  # tiny: 20 steps x 8 pairs >= 32, computes
  assert why is None
  t, s, info = reference_cache.attach(rt, params, train, test, compute_off="a reason")
  assert info == "off: no entry; a reason" and t is train and s is test and not os.listdir(tmp_path)


KILL_SCRIPT = """
import sys, numpy as np
from dpo_jax.train import reference_cache
rows = {"train": (np.arange(5), -np.arange(10.0).reshape(5, 2) - 1), "test": (np.arange(3), -np.ones((3, 2)))}
reference_cache.store(sys.argv[1], sys.argv[2], rows, {"format": reference_cache.FORMAT})
print("stored", flush=True)
"""


def test_kill_9_between_the_rows_and_the_manifest_leaves_nothing_that_is_read(tmp_path):
  from subprocess_env import without_emulated_devices
  key, sizes = "f" * 64, {"train": 5, "test": 3}
  env = without_emulated_devices(**{reference_cache.ENV_TEST_PAUSE: "120", "JAX_PLATFORMS": "cpu",
                                    "PYTHONPATH": REPO})
  proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), key], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()  # printed once the rows file is written, before the manifest
    assert reference_cache.ENV_TEST_PAUSE in line, line + proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  (tmp,) = os.listdir(tmp_path)
  assert tmp.startswith(key + ".tmp-") and "rows-0-of-1.npz" in os.listdir(tmp_path / tmp)  # killed mid-write
  assert reference_cache.read(str(tmp_path), key, sizes) == (None, "no entry")
  # the next store completes and is served; the dead run's folder is never read
  rows = {"train": (np.arange(5), -np.arange(10.0).reshape(5, 2) - 1), "test": (np.arange(3), -np.ones((3, 2)))}
  assert reference_cache.store(str(tmp_path), key, rows, {"format": reference_cache.FORMAT}) == (True, "")
  np.testing.assert_array_equal(reference_cache.load(str(tmp_path), key, sizes)["train"], rows["train"][1])


# ---- multi-host: 2 processes x 4 devices write and read what 1 process x 8 devices reads and writes ----

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(tmp_path, cache, tag):
  """Run `attach` in 2 processes x 4 CPU devices (jax.distributed); -> [(info line, {split: values})] per process."""
  from subprocess_env import with_emulated_devices
  port = _free_port()
  env = with_emulated_devices(4, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(port), str(pid), str(tmp_path / "data"),
                             str(cache), str(tmp_path / f"{tag}-{pid}.npz")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out[-3000:] + err[-5000:]
  results = []
  for pid, (out, _) in enumerate(outs):
    (line,) = [x for x in out.splitlines() if x.startswith("reference cache: ")]
    with np.load(tmp_path / f"{tag}-{pid}.npz") as z:
      results.append((line, {k: z[k] for k in z.files}))
  return results


@pytest.mark.slow
def test_any_host_count_reuses_an_entry(tmp_path):
  write_data(str(tmp_path / "data"))
  by_two, by_one = tmp_path / "cache_2x4", tmp_path / "cache_1x8"
  two = _two_processes(tmp_path, by_two, "write")  # 2 x 4 computes: each host its rows, one file each
  for line, _ in two:
    assert line.startswith("reference cache: miss (no entry)"), line
  (entry,) = os.listdir(by_two)
  assert sorted(os.listdir(by_two / entry)) == ["manifest.json", "rows-0-of-2.npz", "rows-1-of-2.npz"]
  rows = json.loads((by_two / entry / "manifest.json").read_text())["files"]
  # host 0 fed pairs 0-3, 8-11, 16-19 of the 20 train pairs, host 1 the rest (eval batches of 8, 4 per host)
  assert rows["rows-0-of-2.npz"]["rows"] == {"train": 12, "test": 8}
  assert rows["rows-1-of-2.npz"]["rows"] == {"train": 8, "test": 4}
  np.testing.assert_array_equal(two[0][1]["train"], two[1][1]["train"])  # every host holds every pair

  # 1 process x 8 devices (this one): a hit on the 2-host entry, and the same numbers it computes itself
  rt, params, train, test = build(make_config(str(tmp_path / "data"), by_two), tmp_path / "wd")
  hit, hit_test, info = reference_cache.attach(rt, params, train, test)
  assert info == f"hit {by_two / entry}", info
  np.testing.assert_array_equal(hit.reference_logps, two[0][1]["train"])
  np.testing.assert_array_equal(hit_test.reference_logps, two[0][1]["test"])
  rt_one = dataclasses.replace(rt, config=make_config(str(tmp_path / "data"), by_one))
  mine, mine_test, info = reference_cache.attach(rt_one, params, train, test)
  assert info.startswith("miss (no entry)"), info
  assert os.listdir(by_one) == [entry]  # the same key on both host counts
  np.testing.assert_allclose(mine.reference_logps, hit.reference_logps, rtol=1e-6)
  np.testing.assert_allclose(mine_test.reference_logps, hit_test.reference_logps, rtol=1e-6)

  # and back: 2 x 4 hit the 1-process entry and read exactly its values
  for line, values in _two_processes(tmp_path, by_one, "read"):
    assert line == f"reference cache: hit {by_one / entry}", line
    np.testing.assert_array_equal(values["train"], mine.reference_logps)
    np.testing.assert_array_equal(values["test"], mine_test.reference_logps)


def _worker(port, pid, data_dir, cache, out):
  from dpo_jax.train import distributed
  distributed.initialize(distributed.Settings(f"127.0.0.1:{port}", 2, int(pid), timeout_s=120))
  rt, params, train, test = build(make_config(data_dir, cache, reference_cache="on"), os.path.join(cache, "..", "wd"))
  train, test, info = reference_cache.attach(rt, params, train, test)
  print(f"reference cache: {info}", flush=True)
  np.savez(out, train=train.reference_logps, test=test.reference_logps)


# ---- the trainer: a second run reads what the first computed, and trains the same ----

@pytest.mark.slow
def test_a_rerun_hits_and_trains_exactly_like_the_first(tmp_path, capsys, monkeypatch):
  import shutil
  from dpo_jax import step
  from trainer_runs import read_metrics
  data = write_data(str(tmp_path / "data"))
  computed, compiled_with = [], []
  real_compute, real_jit = reference_cache.host_reference_logps, step.jit_train_step
  monkeypatch.setattr(reference_cache, "host_reference_logps", lambda *a: computed.append(1) or real_compute(*a))

  def spy(*args, **kwargs):
    compiled_with.append(kwargs["reference_shardings"])
    return real_jit(*args, **kwargs)

  monkeypatch.setattr(step, "jit_train_step", spy)
  # 5 steps x 8 pairs >= 20 + 12 pairs to compute: 'auto' computes
  fields = {"sft.steps": 2, "optim.total_steps": 5, "optim.warmup_steps": 0, "log_every_steps": 1,
            "eval.every_steps": 0}
  config = lambda **f: make_config(data, tmp_path / "cache", **fields, **f)

  first = pipeline.run(config(), str(tmp_path / "first"))
  assert "reference cache: miss (no entry): computed pi_ref's log-probs of 20 train + 12 test pairs" in \
      capsys.readouterr().out
  assert len(computed) == 2 and compiled_with == [None]  # the DPO step has no pi_ref argument

  # stage 'dpo' from the first run's SFT result: the same pi_ref, a hit, and no reference forward over the data
  for name in ("second", "in_step"):
    shutil.copytree(tmp_path / "first" / "sft", tmp_path / name / "sft")
  second = pipeline.run(config(stage="dpo"), str(tmp_path / "second"))
  assert "reference cache: hit " in capsys.readouterr().out
  assert len(computed) == 2 and compiled_with == [None, None]
  a, b = read_metrics(str(tmp_path / "first"), "dpo"), read_metrics(str(tmp_path / "second"), "dpo")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit: the same pi_ref log-probs
  assert a[-1]["loss"] != a[0]["loss"]
  for key in ("accuracy", "margin", "dpo_loss", "nll"):
    assert second["pi_theta"][key] == first["pi_theta"][key], key

  # pi_ref in the step (the cache off) trains the same up to float rounding
  in_step = pipeline.run(config(stage="dpo", reference_cache="off"), str(tmp_path / "in_step"))
  assert "reference cache: off: config.reference_cache='off'" in capsys.readouterr().out
  assert compiled_with[-1] is not None
  c = read_metrics(str(tmp_path / "in_step"), "dpo")
  np.testing.assert_allclose([r["loss"] for r in c], [r["loss"] for r in a], rtol=1e-5)
  assert in_step["pi_theta"]["dpo_loss"] == pytest.approx(first["pi_theta"]["dpo_loss"], rel=1e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(*sys.argv[2:])
