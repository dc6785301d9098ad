"""Sphinx configuration of sb3-trpo's documentation (build: python -m sphinx -W --keep-going docs docs/_build/html)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sb3_trpo  # noqa: E402

project = "sb3-trpo"
author = "The sb3-trpo developers"
copyright = "2026, The sb3-trpo developers"
release = version = sb3_trpo.__version__

extensions = [
    "sphinx.ext.autodoc",  # the API reference from the docstrings (their :param: fields)
    "sphinx.ext.viewcode",
    "myst_parser",  # the guide pages are Markdown, as the README they came from
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 4  # `page.md#a-heading` links, as GitHub writes them
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = True

# SB3's choice (Read the Docs theme): SB3 users find their way around the same layout
html_theme = "sphinx_rtd_theme"
html_title = f"sb3-trpo {release}"
html_theme_options = {"navigation_depth": 3}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
