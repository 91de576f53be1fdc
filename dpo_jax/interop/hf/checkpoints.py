"""HF checkpoint folders (`save_pretrained` layout: config.json + model.safetensors, or a sharded index):
loaded tensor by tensor straight into the params' shardings, and written (sharded above `max_shard_bytes`).

    cfg, params = load_hf_checkpoint("ckpt_dir", mesh=mesh, rules=rules)   # sharded straight onto the mesh
    save_hf_checkpoint(params, cfg, "out_dir", model_type="llama", tokenizer=tok)

Only safetensors are read (never a pickle); transformers and safetensors are imported when called.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dpo_jax import sharding
from dpo_jax.model import ModelConfig, param_logical_axes
from dpo_jax.interop.hf import families, layouts


_CONFIG_FILE = "config.json"


_SINGLE_FILE = "model.safetensors"


_INDEX_FILE = "model.safetensors.index.json"


def weight_map(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file (absolute) of a checkpoint folder, every file checked complete (header only:
  `check_weight_file`); raises FileNotFoundError, or ValueError for a truncated file."""
  from safetensors import SafetensorError, safe_open

  index = os.path.join(path, _INDEX_FILE)
  single = os.path.join(path, _SINGLE_FILE)
  if os.path.isfile(index):  # transformers prefers the index too when both exist
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    absent = sorted({f for f in files.values() if not os.path.isfile(f)})
    if absent:
      raise FileNotFoundError(f"hf checkpoint {path}: {_INDEX_FILE} lists shards that do not exist: {absent}. "
                              "Copy the whole checkpoint folder.")
    for file in sorted(set(files.values())):
      check_weight_file(file)
    return files
  if os.path.isfile(single):
    check_weight_file(single)
    try:
      with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}
    except SafetensorError as err:
      raise _unreadable(single, err) from err
  others = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack")))
  hint = (f" It has {others}, which this loader does not read: load it with transformers "
          "(AutoModelForCausalLM.from_pretrained) and re-save it with `save_pretrained(new_path)`, which writes "
          "safetensors (always in transformers 5; pass safe_serialization=True in 4.x)." if others else "")
  raise FileNotFoundError(
      f"hf checkpoint {path}: no weights; expected {_SINGLE_FILE} or {_INDEX_FILE} with its shards.{hint}")


def check_weight_files(path: str) -> None:
  """`check_weight_file` on each weight file of the checkpoint folder `path` that exists (a missing one is
  `weight_map`'s error): the trainer calls it with the config checks, before any data or compute."""
  index, single = os.path.join(path, _INDEX_FILE), os.path.join(path, _SINGLE_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        names = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      return  # a broken index is reported where it is read
    files = [os.path.join(path, name) for name in sorted(names)]
  else:
    files = [single]
  for file in files:
    if os.path.isfile(file):
      check_weight_file(file)


_REDOWNLOAD = "Download it again (or copy it again from a complete checkpoint)."
_MAX_HEADER_BYTES = 100_000_000  # safetensors refuses longer headers


def _what(file: str) -> str:
  """'hf checkpoint file F', or '... shard F' for a file of a sharded checkpoint (model-0000k-of-0000n)."""
  kind = "shard" if os.path.basename(file) != _SINGLE_FILE else "file"
  return f"hf checkpoint {kind} {file}"


def check_weight_file(file: str) -> None:
  """Raise ValueError naming `file`, its size on disk and the size its header promises, unless the two agree.

  A safetensors file is an 8-byte little-endian header length N, N bytes of JSON whose entries' `data_offsets`
  [begin, end] count from the end of the header, then the data: 8 + N + the largest end bytes in all. Only the
  header is read, so a truncated or partly downloaded file fails here in milliseconds, before any tensor is read
  (safetensors' own error says only "incomplete metadata, file not fully covered").
  """
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    head = f.read(8)
    if head == b"version " and b"git-lfs" in f.read(200):
      raise ValueError(f"{_what(file)} is a Git LFS pointer ({size:,} bytes), not the weights: run `git lfs pull` in "
                       f"{os.path.dirname(file)}, or download the file again.")
    if len(head) < 8:
      raise ValueError(f"{_what(file)} is incomplete: {size:,} bytes on disk, too short for even the 8-byte header "
                       f"length of a safetensors file (a download or copy that stopped early). {_REDOWNLOAD}")
    n = int.from_bytes(head, "little")
    if n > _MAX_HEADER_BYTES:
      raise ValueError(f"{_what(file)} is not a safetensors file: its first 8 bytes ({head!r}) are no header length "
                       f"(an error page or another format saved under this name?). {_REDOWNLOAD}")
    if 8 + n > size:
      raise ValueError(f"{_what(file)} is incomplete: {size:,} bytes on disk, but its header alone says it is "
                       f"{8 + n:,} bytes long, so the header itself is cut (a download or copy that stopped early) or "
                       f"this is not a safetensors file. {_REDOWNLOAD}")
    try:
      f.seek(8)
      header = json.loads(f.read(n))
      end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
      raise ValueError(f"{_what(file)} is not a readable safetensors file: its {n:,}-byte header is not the JSON of "
                       f"a tensor table ({type(err).__name__}: {err}); the file is damaged or not safetensors. "
                       f"{_REDOWNLOAD}") from err
  expected = 8 + n + end
  if size < expected:
    raise ValueError(f"{_what(file)} is incomplete: {size:,} bytes on disk, but its header says {expected:,} "
                     f"(a download or copy that stopped early). {_REDOWNLOAD}")
  if size > expected:
    raise ValueError(f"{_what(file)} is damaged: {size:,} bytes on disk, but its header says {expected:,} (bytes "
                     f"after the last tensor). {_REDOWNLOAD}")


def _unreadable(file: str, err: Exception) -> ValueError:
  """The one-line error for a weight file safetensors refused; the size check raises first when it explains it."""
  check_weight_file(file)
  return ValueError(f"{_what(file)} cannot be read by safetensors ({' '.join(str(err).split())}): it is damaged "
                    f"or incomplete. {_REDOWNLOAD}")


class _TensorReader:
  """Reads one tensor at a time from safetensors files, keeping each file open once.

  numpy has no bfloat16 in safetensors' numpy backend, so BF16 tensors are read through torch (exact: `to_numpy`
  upcasts to fp32 and the param dtype cast restores bf16 bit-for-bit). safetensors' flax backend would work too,
  but it puts the whole tensor on the default device, the unsharded copy this loader exists to avoid.
  """

  def __init__(self, files: Mapping[str, str]):
    self._files = dict(files)
    self._handles: dict[tuple[str, str], Any] = {}

  def _handle(self, file: str, framework: str) -> Any:
    from safetensors import safe_open
    key = (file, framework)
    if key not in self._handles:
      self._handles[key] = safe_open(file, framework=framework)
    return self._handles[key]

  def get(self, name: str) -> Any:
    from safetensors import SafetensorError
    file = self._files[name]
    try:
      return self._get(name, file)
    except SafetensorError as err:  # `weight_map` checked its size: the file changed since, or is damaged inside
      raise _unreadable(file, err) from err

  def _get(self, name: str, file: str) -> Any:
    handle = self._handle(file, "numpy")
    if handle.get_slice(name).get_dtype() != "BF16":
      return handle.get_tensor(name)
    try:
      import torch  # noqa: F401
    except ImportError as e:
      raise ImportError(f"hf checkpoint: {name} in {file} is bfloat16, which safetensors reads only through "
                        "torch here; install torch (CPU is enough) or re-save the checkpoint in float32.") from e
    return self._handle(file, "pt").get_tensor(name)


def _place(x: np.ndarray, mesh: Any, rules: Any, logical_axes: tuple[Any, ...], what: str) -> Any:
  """`x` as a jax array in its NamedSharding, each device getting only its shard (no unsharded device copy)."""
  if mesh is None:
    return x
  target = sharding.named_sharding(mesh, rules, logical_axes, x.shape, what=what)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def load_hf_checkpoint(path: str, *, mesh: Any = None, rules: Any = None,
                       **config_overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """`(ModelConfig, params)` from a local HF checkpoint folder, read tensor by tensor.

  Args:
    path: folder with `config.json` and `model.safetensors` or `model.safetensors.index.json` + shards, as
      written by `save_pretrained` (or `save_hf_checkpoint`). Read offline; nothing is downloaded.
    mesh, rules: when given (both), every param is placed straight into its NamedSharding from
      `model.param_logical_axes(cfg)` and `rules` (e.g. `configs.default.SHARDING_RULES`); each device receives
      only its own shard. Without them params are host numpy arrays.
    config_overrides: ModelConfig fields (param_dtype, scan_layers, ...), as in `model_config_from_hf`.

  Host memory peaks at one converted tensor, or with `scan_layers` at one stacked `[num_layers, ...]` leaf
  (the L per-layer tensors are gathered into one host buffer before placing it).
  Raises FileNotFoundError for a missing folder / config / weights, ValueError for tensors that do not match.
  """
  import transformers

  check_folder(path, mesh, rules, caller="load_hf_checkpoint")
  hf_config = transformers.AutoConfig.from_pretrained(path)
  cfg = families.model_config_from_hf(hf_config, **config_overrides)
  return cfg, read_params(path, cfg, hf_config.model_type, weight_map(path), mesh=mesh, rules=rules)


def check_folder(path: str, mesh: Any, rules: Any, *, caller: str) -> None:
  """Raise FileNotFoundError unless `path` is a folder with a `config.json`, ValueError unless mesh and rules are
  both given or both None; `caller` names the loader in that error."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"hf checkpoint {path}: no such folder; expected a local folder with {_CONFIG_FILE} "
                            f"and {_SINGLE_FILE} (or {_INDEX_FILE} + shards), as written by save_pretrained.")
  if not os.path.isfile(os.path.join(path, _CONFIG_FILE)):
    raise FileNotFoundError(f"hf checkpoint {path}: no {_CONFIG_FILE}; save the model with save_pretrained, "
                            "which writes it next to the weights.")
  if (mesh is None) != (rules is None):
    raise ValueError(f"{caller}: pass both mesh and rules (e.g. config.sharding.rules), or neither.")


def read_tensor(files: Mapping[str, str], name: str) -> np.ndarray:
  """One tensor of a checkpoint as numpy (bf16 read exactly, as fp32); `files` is `weight_map`'s."""
  return layouts.to_numpy(_TensorReader({name: files[name]}).get(name))


def read_params(path: str, cfg: ModelConfig, model_type: str, files: Mapping[str, str], *, mesh: Any = None,
                rules: Any = None) -> dict[str, Any]:
  """Decoder params for `cfg` from the tensors `files` (HF name -> safetensors file, as from `weight_map`),
  converted and placed one tensor at a time as `load_hf_checkpoint` describes; `path` names the folder in errors.

  `files` must hold exactly the decoder's tensors (a tied `lm_head.weight` may be there too): a caller reading a
  checkpoint with more (a classifier's `score.weight`) leaves those out. Raises ValueError for tensors that do
  not match cfg.
  """
  layout = layouts.layout_of(model_type)
  sources = layouts.tensor_sources(set(files), cfg, layout)  # MoE: fused expert tensors, if a file has them
  try:
    layouts.check_names(set(sources), cfg, layout)
  except ValueError as e:
    raise ValueError(f"hf checkpoint {path}: {e}") from None
  reader = _TensorReader(files)
  get = layouts.source_getter(sources, reader.get)
  dtype = np.dtype(cfg.param_dtype)
  if cfg.tie_embeddings and layout.tied_head in files:
    head, embedding = reader.get(layout.tied_head), reader.get(layout.embedding)
    if not np.array_equal(layouts.to_numpy(head), layouts.to_numpy(embedding)):
      raise ValueError(f"hf checkpoint {path}: {layout.tied_head} differs from {layout.embedding} but the config "
                       "ties them; pass tie_embeddings=False.")
  axes = _logical_axes(cfg, mesh)

  def place(leaf_path: tuple[str, ...], x: np.ndarray) -> None:
    layouts.set_path(params, leaf_path, _place(x, mesh, rules, _axes_at(axes, leaf_path), "/".join(leaf_path)))

  params: dict[str, Any] = {}
  for rule in layout.global_rules(cfg):
    place(rule.path, rule.read(get, 0, dtype))
  if cfg.scan_layers:  # every layer alike (`model._check_moe`), so layer 0's rules name every layer's tensors
    for rule in layout.layer_rules(cfg, 0):
      first = rule.read(get, 0, dtype)
      stacked = np.empty((cfg.num_layers,) + first.shape, dtype)  # the one host buffer of a scanned leaf
      stacked[0] = first
      for i in range(1, cfg.num_layers):
        stacked[i] = rule.read(get, i, dtype)
      place(("layers",) + rule.path, stacked)
  else:
    for i in range(cfg.num_layers):
      for rule in layout.layer_rules(cfg, i):
        place((f"layers_{i}",) + rule.path, rule.read(get, i, dtype))
  return params


def _logical_axes(cfg: ModelConfig, mesh: Any) -> Any:
  """Logical axis names of every param; None for unsharded loads (saves tracing the model's init)."""
  if mesh is None:
    return None
  return param_logical_axes(cfg)


def _axes_at(axes: Any, path: tuple[str, ...]) -> Any:
  return None if axes is None else layouts.get_path(axes, path)


def _shards(state_dict: Mapping[str, np.ndarray], max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
  """Greedy split in name order into groups of at most `max_shard_bytes` (a bigger tensor gets its own)."""
  if max_shard_bytes is None:
    return [dict(state_dict)]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in state_dict.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  return shards


def save_hf_checkpoint(params: Mapping[str, Any], cfg: ModelConfig, path: str, *, model_type: str | None = None,
                       tokenizer: Any = None, hf_config: Any = None, max_shard_bytes: int | None = None) -> None:
  """Write `params` as an HF checkpoint folder that `AutoModelForCausalLM.from_pretrained(path)` loads.

  Writes `config.json` (`hf_config` if given, else `hf_config_from_model_config(cfg, model_type)`; `model_type`
  None = `families.family_for(cfg)`: 'llama' for a dense cfg it expresses, 'mixtral' for a Mixtral-shaped MoE), the
  weights from `hf_state_dict_from_params` in the params' dtype as `model.safetensors`, or, when they exceed
  `max_shard_bytes`, as `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`; and
  `tokenizer.save_pretrained(path)` when a tokenizer is given. Params may be sharded jax arrays (gathered to
  host one tensor at a time by the export). Weight files of an earlier save in `path` are replaced.
  """
  from safetensors.numpy import save_file

  if model_type is None:
    model_type = families.family_for(cfg)
  if hf_config is None:
    hf_config = families.hf_config_from_model_config(cfg, model_type)
  else:
    model_type = getattr(hf_config, "model_type", model_type)
    families.check_hf_config_describes(hf_config, cfg)
  state_dict = layouts.hf_state_dict_from_params(params, cfg, model_type=model_type)
  os.makedirs(path, exist_ok=True)
  # A stale index or single file left from a save with other sharding would shadow or contradict this one.
  for old in [os.path.join(path, _SINGLE_FILE), os.path.join(path, _INDEX_FILE),
              *glob.glob(os.path.join(path, "model-*-of-*.safetensors"))]:
    if os.path.isfile(old):
      os.remove(old)
  hf_config.save_pretrained(path)
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it
  shards = _shards(state_dict, max_shard_bytes)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, _SINGLE_FILE), metadata=metadata)
  else:
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
      file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, file), metadata=metadata)
      weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(x.nbytes for x in state_dict.values())}, "weight_map": weight_map}
    with open(os.path.join(path, _INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
