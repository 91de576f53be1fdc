"""The package's layering (.importlinter, README "Layout"): `lint-imports` passes on the tree and names the
import when a module reaches up a layer or closes a circle."""

import os
import shutil
import subprocess
import sys

import pytest

from paths import REPO_ROOT

LINT = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(root):
  env = dict(os.environ, PYTHONPATH=str(root))
  return subprocess.run([LINT, "--config", os.path.join(REPO_ROOT, ".importlinter"), "--no-cache"], cwd=root,
                        env=env, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_its_layers():
  out = lint(REPO_ROOT)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "0 broken" in out.stdout


@pytest.mark.parametrize("module,line,named", [
    ("model.py", "from dpo_jax.train import pipeline", "dpo_jax.model -> dpo_jax.train.pipeline"),
    ("data/schemas.py", "import jax", "dpo_jax.data.schemas -> jax"),
    ("interop/gguf.py", "from dpo_jax.experiments import sweep", "dpo_jax.interop.gguf -> dpo_jax.experiments.sweep"),
    ("train/runtime.py", "from dpo_jax.train import pipeline", ".runtime -> .pipeline"),
])
def test_a_wrong_way_import_fails_naming_it(tmp_path, module, line, named):
  shutil.copytree(os.path.join(REPO_ROOT, "dpo_jax"), tmp_path / "dpo_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.jsonl", "tokenizer"))
  with open(tmp_path / "dpo_jax" / module, "a") as f:
    f.write(f"\n{line}  # the change under test\n")
  out = lint(tmp_path)
  assert out.returncode != 0
  assert named in out.stdout, out.stdout
