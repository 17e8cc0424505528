"""Files shipped inside the package: the bundled corpus and tokenizer, the YAML presets and the
DeepSpeed templates.

They live under ``relora_dist/`` (``assets/``, ``configs/``, ``ds_configs/``; pyproject's package
data puts them in the wheel) and are found with ``importlib.resources``, so a checkout, an editable
install and an installed wheel resolve them alike. The repo root's ``assets``, ``configs`` and
``ds_configs`` are links to these folders, so the paths README shows work in a checkout.

Only defaults and bare names come from here: a path a user passes stays relative to the working
directory.
"""

from __future__ import annotations

import os
from importlib.resources import files

__all__ = ["CORPUS", "TOKENIZER", "DS_CONFIG", "bundled", "resolve"]

# pip installs wheels unpacked, so these are real paths (datasets, sentencepiece and np.memmap
# need file names, not Traversables).
_ROOT = files("relora_dist")
CORPUS = str(_ROOT / "assets" / "corpus" / "corpus.jsonl.xz")
TOKENIZER = str(_ROOT / "assets" / "tokenizer")
DS_CONFIG = str(_ROOT / "ds_configs" / "zero2.json")


def bundled(folder: str, suffix: str) -> dict[str, str]:
    """Bundled files of ``folder`` ("configs", "ds_configs") ending in ``suffix``: name -> path."""
    entries = (e for e in (_ROOT / folder).iterdir() if e.name.endswith(suffix))
    return {e.name[: -len(suffix)]: str(e) for e in sorted(entries, key=lambda e: e.name)}


def resolve(given: str, folder: str, suffix: str) -> str:
    """``given`` itself when that file exists or it has a folder part (both relative to the working
    directory); else a bare bundled name (``zero3`` or ``zero3.json``, ``60m_paper``) becomes the
    bundled file's path. Anything else comes back unchanged, for the caller's not-found error."""
    if os.path.isfile(given) or os.path.dirname(given):
        return given
    name = given[: -len(suffix)] if given.endswith(suffix) else given
    return bundled(folder, suffix).get(name, given)
