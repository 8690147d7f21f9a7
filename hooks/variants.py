"""The template's variant files, shared by the two generation hooks.

The package folder holds ``<stem>_<choice>.py`` for every choice; the post-generation hook keeps
the chosen one as ``<stem>.py``. ``KEPT_LIST`` (a file of the template, ``[]``) is where the
pre-generation hook lists the plain-named files a regenerated project already holds.
"""

from __future__ import annotations

VARIANTS = {"train": ("nnx", "linen"), "models": ("nnx", "linen"), "parallel": ("jit", "pmap")}
# Which answer chooses each stem's file.
CHOSEN_BY = {"train": "model_api", "models": "model_api", "parallel": "parallelism"}
PLAIN_NAMES = tuple(f"{stem}.py" for stem in VARIANTS)
KEPT_LIST = ".variant_files_kept.json"
