"""Tokenizer: bundled model properties, training, and transformers parity."""
import hashlib
import json
import os
import subprocess
import sys

import pydoc_data.topics
import pytest
import sentencepiece as spm

from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER
from relora_dist.data.tokenizer import (_sampled_texts, _training_sentences, load_tokenizer, tokenizer_checksum,
                                   train_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = list(pydoc_data.topics.topics.values())
TRICKY = ["", " ", "  two leading", "trailing  ", "a\n b \n\n c\n", "tab\tsep\r\nwin",
          "x , y . z ' s", "don't 12345 3.14", "Æsop's café 😀 \u00a0nbsp 日本語",
          "In the beginning God created the heaven and the earth.\n\nAnd God said"]


def test_bundled_tokenizer_properties():
    tok = load_tokenizer(DEFAULT_TOKENIZER)
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (8000, 0, 1, 2, -1)
    # byte_fallback: the 256 byte pieces follow the 3 specials, so no text maps to <unk>.
    assert all(tok.sp.is_byte(i) for i in range(3, 259))
    for text in TRICKY + TOPICS[:20]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    with open(os.path.join(DEFAULT_TOKENIZER, "tokenizer.model"), "rb") as f:
        assert tokenizer_checksum(DEFAULT_TOKENIZER) == hashlib.sha256(f.read()).hexdigest()


def test_bundled_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=os.path.join(DEFAULT_TOKENIZER, "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER)
    assert len(hf) == sp.get_piece_size() == 8000
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    import lzma
    import json
    with lzma.open(DEFAULT_CORPUS, "rt") as f:
        corpus = [json.loads(next(f))["text"] for _ in range(5)]
    for text in TRICKY + TOPICS[:40] + corpus:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:60]
        assert hf.decode(ids) == sp.decode(ids)
    assert hf("Hello")["input_ids"] == sp.encode("Hello")  # config: no BOS/EOS added


def test_train_tokenizer_deterministic_and_path_independent(tmp_path):
    src = tmp_path / "topics.txt"
    # blank-line separated paragraphs = documents for .txt inputs
    src.write_text("\n\n".join(t.strip("\n") for t in TOPICS[:40]))
    a = train_tokenizer([str(src)], str(tmp_path / "a"), vocab_size=600)
    b = train_tokenizer([str(src)], str(tmp_path / "b"), vocab_size=600)
    assert os.path.isfile(a) and os.path.isfile(tmp_path / "a" / "tokenizer_config.json")
    assert tokenizer_checksum(str(tmp_path / "a")) == tokenizer_checksum(str(tmp_path / "b"))
    tok = load_tokenizer(str(tmp_path / "a"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (600, 1, 2)
    text = TOPICS[50]  # unseen text still round-trips (byte fallback)
    assert tok.decode(tok.encode(text)) == text


def test_sampling_documents_bounds_what_is_read(tmp_path):
    """--sample_docs / --sample_mb: a seeded uniform sample, in corpus order; under both caps the
    corpus is read whole (so the bundled tokenizer rebuilds byte-identical)."""
    from relora_dist.data.documents import load_documents
    from relora_dist.tools.train_tokenizer import main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}: {t}"}) + "\n" for i, t in enumerate(TOPICS * 3)))
    docs = load_documents([str(src)])
    texts = list(docs["text"])
    assert list(_sampled_texts(docs, 0, 0)) == texts == list(_sampled_texts(docs, 10**6, 1e6))
    some = list(_sampled_texts(docs, sample_docs=30))
    assert len(texts) == 3 * len(TOPICS) and len(some) == 30 and some == [t for t in texts if t in set(some)]  # corpus order
    assert some == list(_sampled_texts(docs, sample_docs=30)) != list(_sampled_texts(docs, 30, seed=1))
    total = sum(len(t.encode()) for t in texts)
    assert len(list(_sampled_texts(docs, sample_mb=total / 4 / 1e6))) == len(texts) // 4
    assert main(["--input", str(src), "--out", str(tmp_path / "tok"), "--vocab_size", "400",
                 "--sample_docs", "50", "--num_threads", "1"]) == 0
    assert load_tokenizer(str(tmp_path / "tok")).vocab_size == 400


def test_training_sentences_cuts_long_documents():
    doc = "".join(f"line {i} " * 20 + "\n" for i in range(400))
    chunks = list(_training_sentences([doc, "", "short"], max_bytes=2000))
    assert "".join(chunks[:-1]) == doc and chunks[-1] == "short"
    assert all(len(c.encode()) <= 2000 for c in chunks)
    huge = list(_training_sentences(["x" * 10000], max_bytes=1000))
    assert "".join(huge) == "x" * 10000 and all(len(c) <= 1000 for c in huge)


def test_load_tokenizer_missing_dir_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer.py"):
        load_tokenizer(str(tmp_path))


@pytest.mark.spawn
def test_cli_help_shows_defaults():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--input", "--out", "--vocab_size", "--model_type"):
        assert opt in out
    assert "default: 8000" in out and "default: bpe" in out
