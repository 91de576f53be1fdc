"""pi_ref's log-probs of every pair, cached on disk by what they depend on (wing: train; it runs pi_ref on the mesh).

A DPO stage with a frozen reference scores every pair with pi_ref once per epoch and every held-out pair at every
evaluation. With `config.reference_cache` on, the first run computes pi_ref's `[num_pairs, 2]` (chosen, rejected)
log-probs of the train and test splits once, writes them under `<cache_dir>/<key>/`, and trains as with
precomputed log-probs (`TokenizedPairs.reference_logps`: no reference forward in the step, no pi_ref held while
training). A later run with the same key (a rerun, a sweep, an ablation grid, another host count) reads them and
never runs the reference forward over the data.

The key is the SHA-256 of the canonical JSON of `key_parts`:

- `params`: `fingerprint_params` of pi_ref's params (computed on the mesh, so no host ever gathers them);
- `tokens`: the SHA-256 of each split's token ids (prompt / chosen / rejected, row ids, `labels` when the data has
  them, max_length, pad and EOS ids). The tokens are what the tokenizer, the data files, max_length,
  max_prompt_length, truncation and the chat template decide together, so any change to one of those that changes
  a token changes the key;
- `data_files`: the SHA-256 of each split's data file (or every file of a dataset folder), as the issue lists them
  (stricter than the tokens alone: an edit to a column the pairs do not use is a new key too);
- `layout`: each split's batch kind (`runtime.dpo_kind`: shared prompts or not);
- `model`: every `ModelConfig` field but `SPEED_ONLY_MODEL_FIELDS` (dtypes, attention kernel, vocabulary, RoPE,
  ...), and the backend;
- `ld_alpha`: `config.loss.ld_alpha` (LD-DPO's weighting of the tokens past a pair's shared length is applied to
  the stored values, as `step.reference_logps` applies it to an in-step reference);
- `format` and the dpo_jax version (a release that changes the numerics is never served older entries).

The mesh and the host count are not in the key: the rows are the same numbers up to float rounding on any mesh,
and every reader reads every host's file, so a run on another host count reuses an entry.

Layout of an entry (`<cache_dir>/<key>/`)::

  rows-<b>-of-<n>.npz   one per block of the batch that a host feeds (`sharding.batch_feed`; on a pod where the
                        batch axes span the hosts, b = the process index, n = the process count): for each split
                        `<split>_index` `[m]` int64 pair indices into the tokenized split and `<split>_logps`
                        `[m, 2]` float64 nats (chosen, rejected)
  manifest.json         the key, its parts, a readable copy of the config fields it came from, every file's
                        SHA-256 and row counts, the time it was made

An entry is written into `<key>.tmp-<token>/` (each file under a temporary name, then `os.replace`d), and only when
every host's rows and then the manifest are there does process 0 rename the folder to `<key>/`. So a run killed at
any point (kill -9 mid-write) leaves at most a `.tmp-` folder that is never read, and two runs computing the same key
at once never read each other's half-written files. `read` serves an entry only if its manifest names this key,
every listed file's SHA-256 matches, and the rows cover every pair of each split exactly once; otherwise it says
why, and `attach` deletes the entry and computes it again. Each entry is small: 16 bytes a pair.

Multi-host: every host computes the rows of the batches it feeds, writes its own file and reads all of them; hits
and misses are agreed by all hosts (a host that cannot read the entry makes every host recompute, so they stay in
step), and the cache folder must be one that every host sees (a shared filesystem) for entries to be stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import dpo_jax
from dpo_jax import losses, sharding, step
from dpo_jax.data import preference, synthetic
from dpo_jax.train import runtime

FORMAT = 1
MODES = ("auto", "on", "off")  # config.reference_cache
STAGES = ("pipeline", "dpo")  # the stages that train DPO from a frozen pi_ref over tokenized pairs
ENV_DIR = "DPO_JAX_REFERENCE_CACHE"  # the cache folder when config.reference_cache_dir is ''
ENV_TEST_PAUSE = "DPO_JAX_CACHE_TEST_PAUSE"  # tests only: seconds `store` sleeps between the rows and the manifest
DEFAULT_DIR = os.path.join("~", ".cache", "dpo_jax", "reference_logps")
SPLITS = ("train", "test")
# ModelConfig fields that change only speed or memory, never what a log-prob is (up to float rounding), so an entry
# serves every value of them: remat and scanning recompute or loop over the same layers; logits chunking and the
# weight-gradient layout change how the same sums are cut; context parallelism spreads the same attention over
# devices; the init scale only matters before training (the params' fingerprint covers the params themselves).
SPEED_ONLY_MODEL_FIELDS = ("remat", "scan_layers", "logits_chunk_size", "weight_grad_gemm", "context_parallel",
                           "context_load_balance", "initializer_range")


def cache_dir(config: Any) -> str:
  """The cache folder: config.reference_cache_dir, else $DPO_JAX_REFERENCE_CACHE, else
  ~/.cache/dpo_jax/reference_logps."""
  path = config.get("reference_cache_dir", "") or os.environ.get(ENV_DIR, "") or DEFAULT_DIR
  return os.path.abspath(os.path.expanduser(path))


def why_off(config: Any, train: Any) -> str | None:
  """Why the cache does not apply to this run (None: it does): it is turned off, the stage is not a DPO stage with a
  frozen pi_ref, or the step does not score pi_ref as per-pair sums of log-probs."""
  if config.get("reference_cache", "auto") == "off":
    return "config.reference_cache='off'"
  if config.stage not in STAGES:
    return f"config.stage={config.stage!r} (the cache serves the stages {STAGES})"
  if config.data.reference_logps:
    return "the data carries pi_ref's log-probs (config.data.reference_logps=True)"
  loss_type = losses.from_config(config.loss)[0]
  if not losses.needs_reference(loss_type):
    return f"the loss {loss_type!r} is reference-free"
  ref_mode = config.ref_update.mode if "ref_update" in config else "off"
  if ref_mode != "off":
    return f"config.ref_update.mode={ref_mode!r} moves pi_ref while training"
  if not isinstance(train, preference.TokenizedPairs):
    return "ranked data (K responses per prompt) scores pi_ref in the step"
  return None


def why_not_compute(config: Any, train: Any, test: Any) -> str | None:
  """With config.reference_cache='auto', why a missing entry is not computed (None: compute it): computing scores
  every train and test pair once, and is worth it only when the run itself would score at least as many (its DPO
  steps' pairs and its in-loop evaluations of the test split): a short run computing all of them would be slower
  than its reference forwards. An entry that exists is read either way; 'on' always computes a missing one (a sweep
  of short runs that share pi_ref and data)."""
  if config.get("reference_cache", "auto") != "auto":
    return None
  steps, every = config.optim.total_steps, config.eval.every_steps
  saved = steps * config.batch_size + (steps // every if every else 0) * test.num_pairs
  cost = train.num_pairs + test.num_pairs
  if saved >= cost:
    return None
  return (f"'auto' computes one only for a run that scores as many pairs itself ({saved} < {cost} train + test "
          "pairs; --config.reference_cache=on computes it anyway)")


# ---- the key ----

_MIX_1, _MIX_2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)  # murmur3's 32-bit finalizer constants
_GOLDEN = np.uint32(0x9E3779B1)
_SALTS = (0x243F6A88, 0xB7E15162)  # two independent position mixers per leaf: 64 bits per leaf


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's finalizer: a bijection of uint32 that spreads every input bit over the output (wrapping arithmetic)."""
  h = h ^ (h >> 16)
  h = h * _MIX_1
  h = h ^ (h >> 13)
  h = h * _MIX_2
  return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """`x`'s bit patterns as uint32 (2- and 1-byte types zero-extended; 8-byte types as `[..., 2]` halves)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise ValueError(f"fingerprint_params: a leaf of dtype {x.dtype} cannot be fingerprinted (1, 2, 4 or 8 bytes).")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major flat index, uint32 (wrapping past 2**32 elements), `shape`."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride % 2 ** 32)
    stride *= shape[d]
  return idx


def _leaf_sums(x: jax.Array, leaf: jax.Array | int) -> jax.Array:
  """`[2]` uint32: sum_i fmix32(bits_i * m_k(i, leaf)), k = 1, 2, with odd position mixers m_k, mod 2**32.

  The sum is over integers mod 2**32, so it is exact in any order: any sharding, device count or host count adds
  up to the same number. Each term is a bijection of its element's bits (an odd multiplier, then fmix32), so
  changing any one element (by one ulp, say) always changes both sums; the position mixers make moved elements
  count too."""
  bits = _bits(x)
  idx = _flat_index(bits.shape)
  out = []
  for salt in _SALTS:
    seed = jnp.asarray(leaf, jnp.uint32) * np.uint32(0x27D4EB2F) + np.uint32(salt)
    mixer = _fmix32(idx * _GOLDEN + seed) | np.uint32(1)
    out.append(jnp.sum(_fmix32(bits * mixer), dtype=jnp.uint32))
  return jnp.stack(out)


@functools.lru_cache(maxsize=None)
def _sums_fn(out_sharding: Any) -> Any:
  """`_leaf_sums` jitted with the leaf number an argument: one compile per distinct leaf shape, dtype and sharding
  (the layers of a model repeat theirs), each a fused elementwise pass and a reduction."""
  return jax.jit(_leaf_sums, out_shardings=out_sharding)


def fingerprint_params(params: Any) -> str:
  """SHA-256 (hex) of a params pytree: every leaf's path, shape, dtype and the two `_leaf_sums` of its values.

  The sums run on the device, in one jitted function over the global (sharded, possibly multi-host) arrays; only
  `[leaves, 2]` uint32 comes back to the host. The result is the same for any sharding of the same values."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if not leaves:
    return hashlib.sha256(b"no leaves").hexdigest()
  arrays = [x for _, x in leaves]
  first = getattr(arrays[0], "sharding", None)
  out_sharding = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                  if isinstance(first, jax.sharding.NamedSharding) else None)
  fn = _sums_fn(out_sharding)
  sums = [fn(x, np.uint32(i)) for i, x in enumerate(arrays)]  # dispatched together, read back below
  sums = [np.asarray(s.addressable_shards[0].data) for s in sums]  # replicated: every host holds all of it
  h = hashlib.sha256()
  for (path, x), s in zip(leaves, sums):
    h.update(json.dumps([jax.tree_util.keystr(path), list(np.shape(x)), str(x.dtype)]).encode())
    h.update(s.astype("<u4").tobytes())
  return h.hexdigest()


def tokens_sha256(tokenized: preference.TokenizedPairs) -> str:
  """SHA-256 (hex) of a split's tokens: prompt / chosen / rejected ids (lengths and values), row ids, `labels`
  when the data has them (unpaired data), max_length, pad and EOS ids, and fixed shared-prompt widths."""
  h = hashlib.sha256()

  def add(name: str, array: Any) -> None:
    a = np.ascontiguousarray(array)
    h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())

  for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
    seqs = getattr(tokenized, name)
    add(f"{name}.lengths", np.asarray([len(s) for s in seqs], np.int64))
    add(name, np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64))
  add("row_ids", np.asarray(tokenized.row_ids, np.int64))
  labels = getattr(tokenized, "labels", None)
  if labels is not None:
    add("labels", np.asarray(labels))
  h.update(json.dumps({"max_length": tokenized.max_length, "pad_id": tokenized.pad_id, "eos_id": tokenized.eos_id,
                       "widths": list(tokenized.widths) if tokenized.widths else None}).encode())
  return h.hexdigest()


def data_sources(config: Any) -> dict[str, str]:
  """{split: what the split is read from}, as `runtime.load_pairs` picks it ('' = the embedded task's files)."""
  train = config.data.train or str(synthetic.train_path())
  test = config.data.test or (str(synthetic.test_path()) if not config.data.train else config.data.train)
  return {"train": train, "test": test}


def path_sha256(path: str) -> str:
  """SHA-256 (hex) of a file's bytes, or of every file of a folder (relative paths and contents, sorted); a source
  that is not a local path (a hub dataset name) is named, not hashed (its tokens are in the key)."""
  def file_digest(p: str) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()

  if os.path.isfile(path):
    return file_digest(path)
  if os.path.isdir(path):
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(root, name)
        h.update(f"{os.path.relpath(full, path)}:{file_digest(full)};".encode())
    return h.hexdigest()
  return f"not a local path: {path}"


def model_fields(model_cfg: Any) -> dict[str, Any]:
  """The ModelConfig fields that decide what a log-prob is: all of them but SPEED_ONLY_MODEL_FIELDS."""
  return {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in SPEED_ONLY_MODEL_FIELDS}


def key_parts(config: Any, model_cfg: Any, reference: Any, train: preference.TokenizedPairs,
              test: preference.TokenizedPairs) -> dict[str, Any]:
  """Everything pi_ref's log-probs of `train` and `test` depend on (module docstring), as JSON-able values."""
  return {
      "format": FORMAT,
      "dpo_jax": dpo_jax.__version__,
      "params": fingerprint_params(reference),
      "tokens": {"train": tokens_sha256(train), "test": tokens_sha256(test)},
      "data_files": {split: path_sha256(src) for split, src in data_sources(config).items()},
      "layout": {"train": runtime.dpo_kind(config, train), "test": runtime.dpo_kind(config, test)},
      "model": model_fields(model_cfg),
      "backend": jax.default_backend(),
      "ld_alpha": config.loss.get("ld_alpha", None),
  }


def cache_key(parts: dict[str, Any]) -> str:
  """SHA-256 (hex) of the canonical JSON of `parts` (sorted keys, no spaces): the entry's folder name."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def readable(config: Any) -> dict[str, Any]:
  """The config fields an entry's key stands for, for a person reading manifest.json (the key does not use them:
  it hashes the tokens and the files they produce)."""
  return {"data.train": config.data.train, "data.test": config.data.test, "data.train_split": config.data.train_split,
          "data.test_split": config.data.test_split, "data.tokenizer": config.data.tokenizer,
          "data.prompt_sharing": config.data.prompt_sharing, "max_length": config.max_length,
          "max_prompt_length": config.max_prompt_length, "hf.model_path": config.hf.model_path,
          "hf.reference_path": config.hf.reference_path, "model.param_dtype": config.model.param_dtype,
          "model.compute_dtype": config.model.compute_dtype, "loss.ld_alpha": config.loss.get("ld_alpha", None),
          "data_sources": data_sources(config)}


# ---- reading and writing entries ----

def _is_multi() -> bool:
  return jax.process_count() > 1


def _barrier(name: str) -> None:
  if _is_multi():
    multihost_utils.sync_global_devices(f"dpo_jax reference cache: {name}")


def _every_host_agrees(flag: bool) -> bool:
  """True when `flag` is true on every host (a collective: every host calls it)."""
  if not _is_multi():
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))


def _check_same_key(key: str) -> None:
  if not _is_multi():
    return
  keys = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(key), np.uint8).astype(np.int32))
  if not np.all(keys == keys[0]):
    raise ValueError("the hosts computed different reference cache keys: they read different data, configs or "
                     "tokenizers. Give every host the same files and flags (or --config.reference_cache=off).")


def _shared_token() -> str:
  """A random hex token, the same on every host (process 0's)."""
  token = np.random.default_rng().integers(0, 2 ** 31 - 1, size=2, dtype=np.int32)
  if _is_multi():
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
  return "".join(f"{int(t):08x}" for t in token)


def _write_atomic(path: str, data: bytes) -> None:
  """`data` to `path` through a temporary name in the same folder: a reader sees the whole file or none."""
  part = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
  with open(part, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(part, path)


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def read(directory: str, key: str, sizes: dict[str, int]) -> tuple[dict[str, np.ndarray] | None, str]:
  """({split: `[sizes[split], 2]` float64 nats}, 'hit') from entry `<directory>/<key>`, or (None, why not): no
  entry, no manifest (a write that never finished), a file missing or not matching its SHA-256 (truncated,
  changed), or rows that do not cover each split's `sizes[split]` pairs exactly once."""
  entry = os.path.join(directory, key)
  if not os.path.isdir(entry):
    return None, "no entry"
  try:
    with open(os.path.join(entry, "manifest.json"), "rb") as f:
      manifest = json.loads(f.read())
  except FileNotFoundError:
    return None, "no manifest.json in the entry (a write that never finished)"
  except (OSError, ValueError) as e:
    return None, f"manifest.json unreadable ({type(e).__name__})"
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != key:
    return None, "manifest.json is not this key's (format or key differ)"
  files = manifest.get("files")
  if not isinstance(files, dict) or not files:
    return None, "manifest.json lists no files"
  index = {split: [] for split in sizes}
  logps = {split: [] for split in sizes}
  for name, meta in sorted(files.items()):
    if os.path.basename(name) != name or not isinstance(meta, dict):
      return None, f"manifest.json lists a bad file entry {name!r}"
    try:
      with open(os.path.join(entry, name), "rb") as f:
        data = f.read()
    except OSError:
      return None, f"{name} is missing"
    if _sha256(data) != meta.get("sha256"):
      return None, f"{name} does not match its SHA-256 (truncated or changed)"
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as z:
        for split in sizes:
          index[split].append(np.asarray(z[f"{split}_index"]))
          logps[split].append(np.asarray(z[f"{split}_logps"]))
    except Exception as e:  # a zip or array numpy cannot read, or a split it lacks
      return None, f"{name} unreadable ({type(e).__name__})"
  out = {}
  for split, n in sizes.items():
    try:
      idx, vals = np.concatenate(index[split]), np.concatenate(logps[split])
      covered = (idx.ndim == 1 and idx.dtype.kind in "iu" and vals.shape == (len(idx), 2) and vals.dtype == np.float64
                 and len(idx) == n and (not n or (idx.min() >= 0 and idx.max() < n
                                                  and np.bincount(idx, minlength=n).max() == 1)))
    except (ValueError, TypeError):  # arrays of other ranks or kinds than a rows file writes
      covered = False
    if not covered:
      return None, f"the {split} rows do not cover its {n} pairs exactly once"
    if not np.isfinite(vals).all():
      return None, f"the {split} rows hold non-finite log-probs"
    out[split] = np.empty((n, 2), np.float64)
    out[split][idx] = vals
  return out, "hit"


def load(directory: str, key: str, sizes: dict[str, int]) -> dict[str, np.ndarray] | None:
  """`read`'s values, or None when the entry is absent or cannot be served."""
  return read(directory, key, sizes)[0]


def _discard(entry: str) -> None:
  """Remove an entry: renamed aside first (atomic), so no reader ever sees it half deleted."""
  trash = f"{entry}.trash-{uuid.uuid4().hex}"
  try:
    os.rename(entry, trash)
  except FileNotFoundError:
    return
  shutil.rmtree(trash, ignore_errors=True)


def store(directory: str, key: str, split_rows: dict[str, tuple[np.ndarray, np.ndarray]], parts: dict[str, Any], *,
          block: int = 0, blocks: int = 1, config_fields: dict[str, Any] | None = None) -> tuple[bool, str]:
  """Write this host's rows of entry `<directory>/<key>` (every host calls it; module docstring for the layout).

  split_rows: {split: (pair indices `[m]` int (-1: a padding pair, skipped), log-probs `[m, 2]` nats)} of the
  batch block `block` of `blocks` that this host feeds. Returns (whether the entry is in place, as this host sees
  it, why not). An error writing is reported, never raised: the run goes on with the values it computed."""
  entry = os.path.join(directory, key)
  tmp = f"{entry}.tmp-{_shared_token()}"
  name = f"rows-{block}-of-{blocks}.npz"
  error = ""
  try:
    os.makedirs(tmp, exist_ok=True)
    arrays = {}
    for split, (idx, vals) in split_rows.items():
      idx = np.asarray(idx)
      real = idx >= 0
      arrays[f"{split}_index"] = idx[real].astype(np.int64)
      arrays[f"{split}_logps"] = np.asarray(vals)[real].astype(np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_atomic(os.path.join(tmp, name), buffer.getvalue())
  except OSError as e:
    error = f"writing {name}: {e}"
  _barrier("rows written")
  if jax.process_index() == 0:
    try:
      error = error or _publish(entry, tmp, key, parts, blocks, config_fields or {})
    except OSError as e:
      error = f"writing the manifest: {e}"
  _barrier("entry published")
  if os.path.isdir(tmp):  # not published (an error, or a folder the hosts do not share): nothing reads it
    shutil.rmtree(tmp, ignore_errors=True)
  stored = os.path.isfile(os.path.join(entry, "manifest.json"))
  if not stored and not error:
    error = (f"{entry} is not visible from process {jax.process_index()}: config.reference_cache_dir must be a "
             "folder every host sees (a shared filesystem)")
  return stored, error


def _publish(entry: str, tmp: str, key: str, parts: dict[str, Any], blocks: int,
             config_fields: dict[str, Any]) -> str:
  """Process 0: every host's rows file in `tmp` -> manifest.json -> `tmp` renamed to `entry`. Returns an error or ''."""
  pause = float(os.environ.get(ENV_TEST_PAUSE, "0") or 0)
  if pause > 0:  # tests: a window between the rows and the manifest to kill the process in
    print(f"reference cache: {ENV_TEST_PAUSE}: rows written to {tmp}; sleeping {pause} s before the manifest",
          flush=True)
    time.sleep(pause)
  files, totals = {}, {}
  for b in range(blocks):
    name = f"rows-{b}-of-{blocks}.npz"
    try:
      with open(os.path.join(tmp, name), "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return (f"{name} is not in {tmp} as process 0 sees it (a host failed to write it, or "
              "config.reference_cache_dir is not a folder every host sees); nothing stored")
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as z:
        rows = {k[:-len("_index")]: int(z[k].shape[0]) for k in z.files if k.endswith("_index")}
    except Exception as e:  # not what `store` writes: publish nothing
      return f"{name} in {tmp} is unreadable ({type(e).__name__}); nothing stored"
    files[name] = {"sha256": _sha256(data), "rows": rows}
    for split, n in rows.items():
      totals[split] = totals.get(split, 0) + n
  manifest = {"format": FORMAT, "key": key, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "rows": totals, "files": files, "parts": parts, "config": config_fields}
  _write_atomic(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1, default=str).encode())
  try:
    os.rename(tmp, entry)
  except OSError:
    if os.path.isfile(os.path.join(entry, "manifest.json")):  # another run stored the same key first
      return ""
    raise
  return ""


# ---- computing ----

def _host_rows(x: jax.Array, block: int, blocks: int) -> np.ndarray:
  """Rows [block * n, (block + 1) * n) of a global array sharded on its leading axis (n = rows / blocks), read
  from this host's addressable shards only."""
  n = x.shape[0] // blocks
  lo = block * n
  out = np.zeros((n,) + x.shape[1:], x.dtype)
  filled = np.zeros(n, bool)
  for shard in x.addressable_shards:
    rows = shard.index[0]
    start, stop = rows.start or 0, x.shape[0] if rows.stop is None else rows.stop
    a, b = max(start, lo), min(stop, lo + n)
    if a < b:
      out[a - lo:b - lo] = np.asarray(shard.data)[a - start:b - start]
      filled[a - lo:b - lo] = True
  if not filled.all():
    raise RuntimeError(f"reference cache: process {jax.process_index()} holds no shard of rows "
                       f"{lo + int(np.argmin(filled))} of the batch it fed; the batch sharding and the feed disagree.")
  return out


def host_reference_logps(rt: runtime.Runtime, reference: Any,
                         tokenized: preference.TokenizedPairs) -> tuple[np.ndarray, np.ndarray]:
  """pi_ref's log-probs of the pairs this host feeds: (pair indices `[m]` int32 into `tokenized`, -1 for a
  padding pair; log-probs `[m, 2]` float64 nats, (chosen, rejected)).

  The split goes through `preference.eval_batches` of config.eval.batch_size pairs; each host feeds its block of
  every batch (`rt.feed()`) and reads back only its rows of the output (its addressable shards), so nothing is
  gathered across hosts. One host: every pair, in order."""
  config = rt.config
  global_batch = config.eval.batch_size
  block, blocks = rt.feed()
  host = preference.host_pairs(global_batch, block, blocks)
  kind = runtime.dpo_kind(config, tokenized)
  out_sharding = sharding.named_sharding(rt.mesh, rt.rules, ("batch", None), (global_batch, 2),
                                         what="pi_ref's log-probs")
  # What the step would compute from pi_ref, LD-DPO's weighting included (the key holds ld_alpha).
  ld_alpha = config.loss.get("ld_alpha", None)
  score = rt.jitted(f"reference_cache_logps_{ld_alpha}", lambda: jax.jit(
      lambda params, batch: step.reference_logps(rt.model, params, batch, ld_alpha=ld_alpha),
      out_shardings=out_sharding))
  plain = dataclasses.replace(tokenized, reference_logps=None)
  indices, outputs = [], []
  for s, local in enumerate(preference.eval_batches(plain, global_batch=global_batch, process_index=block,
                                                    process_count=blocks, kind=kind)):
    idx = np.arange(s * global_batch + host.start, s * global_batch + host.stop)
    idx[idx >= tokenized.num_pairs] = -1
    expected = np.where(idx >= 0, tokenized.row_ids[np.maximum(idx, 0)], -1)
    if not np.array_equal(local.pop("row_ids"), expected):
      raise RuntimeError("reference cache: eval_batches no longer yields pairs in source order; fix "
                         "host_reference_logps.")
    indices.append(idx.astype(np.int32))
    outputs.append(score(reference, rt.to_global(local)))  # dispatched; read back below
  logps = [_host_rows(x, block, blocks) for x in outputs]
  return np.concatenate(indices), np.concatenate(logps).astype(np.float64)


def _every_pair(rows: tuple[np.ndarray, np.ndarray], num_pairs: int) -> np.ndarray:
  """`[num_pairs, 2]` float64 from every host's `host_reference_logps` rows (gathered when there are several)."""
  idx, vals = rows
  vals = vals.astype(np.float32)  # computed in fp32: exact, and what a collective carries without x64
  if _is_multi():
    idx = np.asarray(multihost_utils.process_allgather(idx)).reshape(-1)
    vals = np.asarray(multihost_utils.process_allgather(vals)).reshape(-1, 2)
  out = np.zeros((num_pairs, 2), np.float64)
  filled = np.zeros(num_pairs, bool)
  real = idx >= 0
  out[idx[real]] = vals[real]
  filled[idx[real]] = True
  if not filled.all():
    raise RuntimeError(f"reference cache: pair {int(np.argmin(filled))} of {num_pairs} was fed by no host.")
  return out


def attach(rt: runtime.Runtime, reference: Any, train: preference.TokenizedPairs, test: preference.TokenizedPairs,
           *, compute_off: str | None = None) -> tuple[preference.TokenizedPairs, preference.TokenizedPairs, str]:
  """`(train, test, info)` with `reference_logps` `[num_pairs, 2]` set from the cache, or computed with `reference`
  and stored (a miss); `info` is one line: 'hit <entry>', 'miss (<why>): computed ... -> <entry>', or, when
  `compute_off` gives a reason not to compute, 'off: <why>; <compute_off>' with `train` and `test` unchanged.

  Every host calls it (the key, the hit and the rows are agreed through collectives). `dataclasses.replace`
  copies: the arguments are not modified."""
  config = rt.config
  directory = cache_dir(config)
  parts = key_parts(config, rt.model_cfg, reference, train, test)
  key = cache_key(parts)
  _check_same_key(key)
  entry = os.path.join(directory, key)
  sizes = {"train": train.num_pairs, "test": test.num_pairs}
  values, why = read(directory, key, sizes)
  if _every_host_agrees(values is not None):
    return (dataclasses.replace(train, reference_logps=values["train"]),
            dataclasses.replace(test, reference_logps=values["test"]), f"hit {entry}")
  if values is not None:
    why = "another host cannot read the entry"
  if compute_off is not None:
    return train, test, f"off: {why}; {compute_off}"
  # Every host has read (the agreement above is a collective), so a damaged entry can go before it is rebuilt.
  if jax.process_index() == 0 and os.path.exists(entry):
    _discard(entry)
  t0 = time.perf_counter()
  block, blocks = rt.feed()
  rows = {split: host_reference_logps(rt, reference, t) for split, t in (("train", train), ("test", test))}
  values = {split: _every_pair(rows[split], sizes[split]) for split in SPLITS}
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    pass  # store reports it
  stored, error = store(directory, key, rows, parts, block=block, blocks=blocks, config_fields=readable(config))
  info = (f"miss ({why}): computed pi_ref's log-probs of {train.num_pairs} train + {test.num_pairs} test pairs in "
          f"{time.perf_counter() - t0:.1f} s -> {entry}" + ("" if stored else f" (not stored: {error})"))
  return (dataclasses.replace(train, reference_logps=values["train"]),
          dataclasses.replace(test, reference_logps=values["test"]), info)
