"""Docs that cannot rot: the site builds with warnings as errors, every Python block marked `python runnable` in
README.md and docs/ runs, and every shell command names configs, variants, fields, flags and files that exist."""

import ast
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from paths import REPO_ROOT

ROOT = Path(REPO_ROOT)
DOCS = ROOT / "docs"
SKIP_DIRS = {"generated", "_build"}  # what the build writes
MARKDOWN = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(DOCS).parts))
REPO_DIRS = ("configs/", "scripts/", "benchmarks/", "launch/", "examples/", "notebooks/", "tests/", "dpo_jax/", "docs/")
SHELLS = {"bash", "sh", "shell", "console"}
TRAINERS = {"dpo_jax.train": "configs/default.py", "dpo_jax.experiments.frontier": "configs/frontier.py"}
ABSL_FLAGS = {"verbosity", "v", "help", "helpfull", "logtostderr", "alsologtostderr", "flagfile"}


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
  """(info string, body, line number) of every fenced block of a Markdown file; fences may be indented."""
  blocks, lines, i = [], path.read_text().split("\n"), 0
  while i < len(lines):
    m = re.match(r"^(\s*)(`{3,})(.*)$", lines[i])
    if not m:
      i += 1
      continue
    indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
    start, body = i + 1, []
    i += 1
    while i < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[i]):
      body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
      i += 1
    blocks.append((info, "\n".join(body), start))
    i += 1
  return blocks


def _where(path: Path, line: int) -> str:
  return f"{path.relative_to(ROOT)}:{line}"


RUNNABLE = [pytest.param(body, id=_where(path, line)) for path in MARKDOWN
            for info, body, line in fenced_blocks(path) if info.split()[:2] == ["python", "runnable"]]


def test_the_marked_python_blocks_are_found():
  ids = [p.id for p in RUNNABLE]
  assert any(i.startswith("README.md") for i in ids) and any(i.startswith("docs/core_api.md") for i in ids), ids


@pytest.mark.parametrize("body", RUNNABLE)
@pytest.mark.slow
def test_a_runnable_python_block_runs(body):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", body], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- shell commands


def commands(body: str) -> list[list[str]]:
  """The commands of a shell block: continuation lines joined, comments dropped, split at && || ; | and ( )."""
  text = re.sub(r"\\\n", " ", body)
  out = []
  for line in text.split("\n"):
    line = line.strip()
    if not line:
      continue
    if line.startswith("$ "):
      line = line[2:]
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    command = []
    for token in lexer:
      if set(token) <= set("&|;()<>"):  # an operator: &&, ||, ;, |, ( ), redirections
        out.append(command)
        command = []
      else:
        command.append(token)
    out.append(command)
  return [c for c in out if c]


@functools.cache
def _config(path: str, variant: str | None):
  spec = importlib.util.spec_from_file_location(f"_docs_config_{Path(path).stem}", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


@functools.cache
def _defined_flags(module: str) -> frozenset[str]:
  path = ROOT / (module.replace(".", "/") + ("/__main__.py" if (ROOT / module.replace(".", "/")).is_dir() else ".py"))
  return frozenset(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", path.read_text())) | ABSL_FLAGS


@functools.cache
def _extras() -> frozenset[str]:
  tree = ast.parse((ROOT / "setup.py").read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
      return frozenset(k.value for k in node.value.keys)
  raise AssertionError("setup.py has no extras_require")


def _trainer_args(args: list[str], default_config: str, flags: frozenset[str], where: str) -> list[str]:
  """Problems with the arguments of a trainer command line (the config, its variant, fields and flags)."""
  problems, config_arg = [], default_config
  for i, arg in enumerate(args):
    if arg == "--config" and i + 1 < len(args):
      config_arg = args[i + 1]
    elif arg.startswith("--config="):
      config_arg = arg.split("=", 1)[1]
  path, _, variant = config_arg.partition(":")
  if not (ROOT / path).is_file():
    return [f"{where}: --config {config_arg}: no file {path}"]
  try:
    config = _config(path, variant or None)
  except ValueError as e:
    return [f"{where}: --config {config_arg}: {e}"]
  for i, arg in enumerate(args):
    if not arg.startswith("--") or arg == "--config" or arg.startswith("--config="):
      continue
    if arg.startswith("--config."):
      field = arg[len("--config."):].split("=", 1)[0]
      if not _has_field(config, field):
        problems.append(f"{where}: {arg}: {config_arg} has no field {field!r}")
    else:
      name = arg[2:].split("=", 1)[0]
      if name.removeprefix("no") not in flags and name not in flags:
        problems.append(f"{where}: {arg}: no such flag (defined: {sorted(flags)})")
  return problems


def _script_args(path: Path, args: list[str], where: str) -> list[str]:
  source = path.read_text()
  return [f"{where}: {arg}: {path.relative_to(ROOT)} defines no such option" for arg in args
          if arg.startswith("--") and f'"{arg.split("=", 1)[0]}"' not in source
          and f'"{arg[2:].split("=", 1)[0]}"' not in source]


def check_command(tokens: list[str], where: str) -> list[str]:
  """Problems with one shell command of the docs: files, modules, configs, fields, flags and extras it names."""
  problems = []
  for token in tokens:  # every repository path it names exists (outputs under docs/_build aside)
    path = token.split(":", 1)[0].split("=", 1)[-1]
    if path.startswith(REPO_DIRS) and not path.startswith("docs/_build") and not (ROOT / path).exists():
      problems.append(f"{where}: {token}: no such file or folder in the repository")
  while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # FOO=bar before the command
    tokens = tokens[1:]
  if not tokens:
    return problems
  head, args = tokens[0], tokens[1:]
  if head in ("python", "python3"):
    if args[:1] == ["-m"] and len(args) > 1:
      module, rest = args[1], args[2:]
      if module.startswith("dpo_jax"):
        if importlib.util.find_spec(module) is None:
          problems.append(f"{where}: python -m {module}: no such module")
        elif module in TRAINERS:
          problems += _trainer_args(rest, TRAINERS[module], _defined_flags(module), where)
        else:
          path = ROOT / (module.replace(".", "/") + ".py")
          problems += _script_args(path, rest, where)
    elif args and args[0].endswith(".py"):
      path = ROOT / args[0]
      problems += [] if not path.is_file() else _script_args(path, args[1:], where)
  elif head.startswith("launch/") or (head == "sbatch" and any(a.startswith("launch/") for a in args)):
    after = args[[a.startswith("launch/") for a in args].index(True) + 1:] if head == "sbatch" else args
    problems += _trainer_args(after, TRAINERS["dpo_jax.train"], _defined_flags("dpo_jax.train"), where)
  elif head == "pip" and args[:1] == ["install"]:
    for arg in args:
      if m := re.match(r"^\.\[([\w,-]+)\]$", arg):
        problems += [f"{where}: {arg}: setup.py has no extra {e!r}" for e in m.group(1).split(",")
                     if e not in _extras()]
  return problems


SHELL_BLOCKS = [(path, line, body) for path in MARKDOWN for info, body, line in fenced_blocks(path)
                if info.split()[:1] and info.split()[0] in SHELLS]


def test_every_shell_command_names_what_exists():
  assert len(SHELL_BLOCKS) > 20, len(SHELL_BLOCKS)  # the finder still finds the blocks
  problems = []
  for path, line, body in SHELL_BLOCKS:
    for tokens in commands(body):
      problems += check_command(tokens, _where(path, line))
  assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_field_flag_variant_file_and_extra():
  bad = {
      "python -m dpo_jax.train --config.loss.bta=0.1": "no field 'loss.bta'",
      "python -m dpo_jax.train --config configs/default.py:huge": "unknown variant",
      "python -m dpo_jax.train --dryrun": "no such flag",
      "python scripts/nope.py --x": "no such file",
      "pip install -e '.[tset]'": "no extra 'tset'",
      "python benchmarks/dpo_step.py --confgs tiny": "defines no such option",
      "launch/local_multiprocess.sh --config configs/default.py:tiny --config.mesh.dta=2": "no field 'mesh.dta'",
  }
  for line, expected in bad.items():
    found = [p for tokens in commands(line) for p in check_command(tokens, "here")]
    assert any(expected in p for p in found), (line, found)
  good = "XLA_FLAGS=--x JAX_PLATFORMS=cpu python -m dpo_jax.train --dry_run --config configs/default.py:tiny \\\n" \
         "  --config.mesh.fsdp=-1 --workdir runs/x  # a comment --config.nope=1"
  assert [p for tokens in commands(good) for p in check_command(tokens, "here")] == []


def test_every_config_field_named_in_the_prose_exists():
  """`--config.a.b` anywhere in README.md or docs/ (prose included) names a field of a shipped config."""
  configs = [_config("configs/default.py", None), _config("configs/frontier.py", None)]
  wrong_on_purpose = {"a.b", "data.batch_size", "optim.learning_rat"}  # a placeholder; misspellings whose error is shown
  problems = []
  for path in MARKDOWN:
    for n, line in enumerate(path.read_text().split("\n"), 1):
      for field in re.findall(r"--config\.([A-Za-z_][\w.]*\w)", line):
        if field not in wrong_on_purpose and not any(_has_field(c, field) for c in configs):
          problems.append(f"{_where(path, n)}: --config.{field}")
  assert not problems, "\n".join(problems)


def _anchors(path: Path) -> set[str]:
  """MyST / GitHub heading slugs of a Markdown file: lower case, punctuation dropped, spaces to hyphens. A `# comment`
  inside a fenced block is no heading."""
  slugs, fenced = set(), False
  for line in path.read_text().split("\n"):
    if re.match(r"^\s*```", line):
      fenced = not fenced
    elif not fenced and (m := re.match(r"^#{1,6} (.*)$", line)):
      slugs.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
  return slugs


def test_readme_links_reach_existing_pages_and_headings():
  """Sphinx checks links between docs pages; README.md is outside the site, so its links are checked here."""
  readme = ROOT / "README.md"
  problems = []
  for target in re.findall(r"\]\(([^)\s]+)\)", readme.read_text()):
    if target.startswith(("http://", "https://")):
      continue
    file, _, anchor = target.partition("#")
    if not (ROOT / file).exists():
      problems.append(f"README.md: ({target}): no {file}")
    elif anchor and anchor not in _anchors(ROOT / file):
      problems.append(f"README.md: ({target}): no heading #{anchor} in {file}")
  assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_page():
  lines = (ROOT / "README.md").read_text().split("\n")
  assert len(lines) <= 200, len(lines)
  commands_at_top = [line for line in lines[:12] if line.startswith("pip install")]
  assert commands_at_top[0].startswith("pip install -e . && python -m dpo_jax.train"), commands_at_top
  assert "lint-imports && pytest" in commands_at_top[1], commands_at_top


@pytest.mark.slow
def test_the_site_builds_with_warnings_as_errors(tmp_path):
  """What CI publishes: sphinx-build -W --keep-going (a broken link or heading anchor, a page outside every
  toctree, a docstring autodoc cannot parse or import fails), offline; then the generated pages hold the code's
  config fields and loss registry, and the notebook page its stored figures."""
  out = tmp_path / "html"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-5000:]
  from dpo_jax import losses
  loss_page = (out / "losses.html").read_text()
  assert all(f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{name}</span></code>" in loss_page
             for name in losses.LOSSES), "the loss table misses a registered loss"
  config_page = (out / "configs.html").read_text()
  spec = importlib.util.spec_from_file_location("_config_table", ROOT / "scripts" / "config_table.py")
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  assert all(f">{name}<" in config_page for name, _, _ in table.rows()), "the config reference misses a field"
  assert "preference_loss" in (out / "api" / "losses.html").read_text()
  notebook = (out / "generated" / "notebooks" / "loss_ablation.html").read_text()
  assert "<img" in notebook, "the notebook page shows no stored figure"
  for page in ["index", "getting_started", "training", "configs", "data", "hf", "lora", "moe", "api/moe", "losses", "online_dpo", "sweeps",
               "scale/multihost", "scale/dry_run", "scale/batch_layouts", "scale/context_parallel", "accelerators",
               "benchmarks", "frontier", "rlhf", "reliability", "core_api", "api/index", "api/rollout", "api/rl",
               "api/rl_step", "generated/notebooks/rl_steps", "design", "testing", "status"]:
    assert (out / f"{page}.html").is_file(), page
