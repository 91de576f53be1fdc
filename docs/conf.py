"""Sphinx configuration of the dpo_jax site (MyST Markdown pages, myst-nb for the notebook, sphinx-book-theme).

Build (offline; warnings are errors, as CI builds it in tests/docs/test_docs.py):

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -b html docs docs/_build/html

The config reference and the loss table are generated while the site builds (docs/_ext/generated.py), from
configs/default.py and `dpo_jax.losses.LOSSES`, so they cannot fall behind the code.
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # dpo_jax and configs/ for autodoc and the generated tables
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # autodoc imports the core modules; no accelerator is probed

project = "dpo_jax"
author = "the dpo_jax authors"
copyright = "2026, the dpo_jax authors"

extensions = [
    "myst_nb",  # MyST Markdown pages and .ipynb notebooks (it loads myst_parser itself)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "generated",  # docs/_ext/generated.py: the config reference, the loss table, the notebook copy
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "frontier/*.json", "frontier/*.csv",
                    "generated/*.md"]  # included into configs.md / losses.md, not pages of their own
myst_enable_extensions = ["colon_fence", "deflist"]
smartquotes = False  # 'auto' and "" in the config reference are values, typed as written
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links resolve, and are checked

# The notebook is rendered with the outputs stored in it (tests/experiments/test_notebook.py executes it).
nb_execution_mode = "off"
nb_merge_streams = True  # the runs print a line at a time: one output block per cell, not one per line

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # shapes and units are in the docstrings; the signatures stay readable
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "dpo_jax"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
default_role = "code"  # `x` in a docstring reads as code, as it does in Markdown
html_last_updated_fmt = None
# Nothing is fetched while building: no intersphinx, no remote images.
highlight_language = "none"  # docstrings' literal blocks are equations and tables, not Python
