"""A truncated or partly downloaded safetensors file in an HF checkpoint folder is one error naming the file, its size
on disk and the size its header promises, with the fix; raised before any tensor is read (the header alone is read),
and at the command line one line on stderr with exit code 2 before the workdir is even made.

The checkpoint is a tiny random Llama saved here with `save_pretrained` (with the embedded task's tokenizer).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402
from torch_models import random_hf_model  # noqa: E402

from dpo_jax.data import synthetic  # noqa: E402
from dpo_jax.interop import hf  # noqa: E402
from dpo_jax.interop.hf import checkpoints  # noqa: E402
from dpo_jax.train import errors  # noqa: E402
from paths import REPO_ROOT  # noqa: E402
from subprocess_env import without_emulated_devices

LLAMA = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=3,
             eos_token_id=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{'single': folder with model.safetensors, 'sharded': folder with 3 shards and the index}, both complete."""
  root = tmp_path_factory.mktemp("hf")
  model = random_hf_model(transformers.LlamaConfig(**LLAMA), 0)
  model.save_pretrained(root / "single")
  synthetic.load_tokenizer().save_pretrained(root / "single")
  model.save_pretrained(root / "sharded", max_shard_size="40KB")
  return {"single": root / "single", "sharded": root / "sharded"}


def copy(saved, kind, tmp_path):
  return shutil.copytree(saved[kind], tmp_path / kind)


def header_end(file):
  """(8 + header length, the size the header promises) of a safetensors file."""
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  return 8 + n, 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


def load_error(path):
  with pytest.raises(ValueError) as info:
    hf.load_hf_checkpoint(str(path))
  assert errors.raised_on_purpose(info.value), "must reach a command-line user as one line, exit code 2"
  return str(info.value)


def test_a_truncated_file_names_itself_its_size_and_the_size_its_header_promises(saved, tmp_path):
  file = copy(saved, "single", tmp_path) / "model.safetensors"
  _, expected = header_end(file)
  os.truncate(file, expected // 2)
  message = load_error(file.parent)
  assert f"hf checkpoint file {file} is incomplete" in message, message
  assert f"{expected // 2:,} bytes on disk, but its header says {expected:,}" in message, message
  assert "Download it again" in message and "\n" not in message, message


@pytest.mark.parametrize("damage,says", [
    ("header_cut", "the header itself is cut"),
    ("header_not_json", "header is not the JSON of a tensor table"),
    ("empty", "too short for even the 8-byte header length"),
    ("html_page", "is not a safetensors file: its first 8 bytes (b'<!DOCTYP')"),
])
def test_a_cut_or_unreadable_header_says_so(saved, tmp_path, damage, says):
  file = copy(saved, "single", tmp_path) / "model.safetensors"
  data = file.read_bytes()
  header, _ = header_end(file)
  file.write_bytes({"header_cut": data[:header // 2],
                    "header_not_json": data[:8] + b"x" * (header - 8) + data[header:],
                    "empty": b"",
                    "html_page": b"<!DOCTYPE html><html>503 Service Unavailable</html>"}[damage])
  message = load_error(file.parent)
  assert str(file) in message and says in message and "Download it again" in message, message


def test_a_truncated_shard_of_a_sharded_checkpoint_is_named(saved, tmp_path):
  folder = copy(saved, "sharded", tmp_path)
  shards = sorted(folder.glob("model-*-of-*.safetensors"))
  assert len(shards) > 1
  _, expected = header_end(shards[1])
  os.truncate(shards[1], expected - 100)
  message = load_error(folder)
  assert f"hf checkpoint shard {shards[1]} is incomplete" in message, message
  assert f"{expected - 100:,} bytes on disk, but its header says {expected:,}" in message, message


def test_a_file_that_changes_after_the_check_is_still_one_error_when_its_tensors_are_read(saved, tmp_path):
  file = copy(saved, "single", tmp_path) / "model.safetensors"
  files = checkpoints.weight_map(str(file.parent))  # checked complete here
  _, expected = header_end(file)
  os.truncate(file, expected - 4096)  # then cut: safetensors' own SafetensorError when the reader opens it
  with pytest.raises(ValueError, match=rf"{file} is incomplete: {expected - 4096:,} bytes on disk, but its header "
                                       rf"says {expected:,}") as info:
    checkpoints._TensorReader(files).get("model.embed_tokens.weight")
  assert errors.raised_on_purpose(info.value)


def test_the_command_line_reports_a_truncated_checkpoint_in_one_line_before_any_work(saved, tmp_path):
  file = copy(saved, "single", tmp_path) / "model.safetensors"
  _, expected = header_end(file)
  os.truncate(file, expected // 3)
  workdir = tmp_path / "run"
  env = without_emulated_devices()
  out = subprocess.run([sys.executable, "-m", "dpo_jax.train", "--config", "configs/default.py:tiny",
                        "--config.progress_bar=False", f"--config.hf.model_path={file.parent}", f"--workdir={workdir}"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == errors.EXIT_CODE and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(f"error: hf checkpoint file {file} is incomplete"), lines
  assert f"{expected // 3:,} bytes on disk, but its header says {expected:,}" in lines[0], lines
  assert not workdir.exists(), "the config checks read only the header, before the workdir, data or any compile"
