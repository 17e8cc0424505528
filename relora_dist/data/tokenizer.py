"""Tokenizers: SentencePiece (training, loading) and Hugging Face ``tokenizer.json`` (loading, with
the ``tokenizers`` library), and their checksum.

We use ``sentencepiece`` directly for training and for tokenizing data (fast and exact).
The tokenizer directory holds ``tokenizer.model`` plus a small ``tokenizer_config.json`` so
that ``transformers.AutoTokenizer.from_pretrained(dir)`` builds the same tokenizer (checked
by tests: identical ids on sample text). No ``tokenizer.json`` is written: it would be ~0.8 MB
for an 8k vocab, and transformers converts ``tokenizer.model`` on load anyway.

Training choices, and why:
  * ``normalization_rule_name="identity"`` and ``remove_extra_whitespaces=False``: the
    transformers conversion of a SentencePiece BPE model does not apply NFKC or collapse
    spaces, so any normalization here would make the two disagree (and lose information).
  * documents are fed whole (newlines included), so ``"\\n"`` becomes an ordinary piece and
    a word right after a newline tokenizes like the training text, instead of every line
    being a separate "sentence" with a dummy-prefix space.
  * ``byte_fallback=True``: unseen characters become byte tokens, never ``<unk>``.
  * ids: unk=0, bos=1, eos=2, no pad (-1); callers pad with eos when they need to.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterable, Iterator

__all__ = ["SPTokenizer", "HFTokenizer", "train_tokenizer", "load_tokenizer", "tokenizer_checksum",
           "MODEL_FILE", "TOKENIZER_FILES", "tokenizer_files", "tokenizer_fingerprint"]

MODEL_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

# The files a tokenizer folder may hold, for SentencePiece and Hugging Face tokenizers alike.
# Checkpoints and exports copy only these (as regular files), and the tokenizer's fingerprint
# covers them: a tokenizer_dir that is a whole model folder must not carry its weights,
# config.json or code into a checkpoint (an export would then be the starting model, or run
# code under trust_remote_code).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja")


def tokenizer_files(tokenizer_dir: str | os.PathLike) -> list[str]:
    """The names in TOKENIZER_FILES that are files in `tokenizer_dir`. A link to a file counts: a
    Hugging Face cache snapshot is made of links, and the user chose that folder; copies out of it
    (checkpoints, exports) are written as regular files, and checkpoint readers refuse links in a
    checkpoint's own tokenizer/ (integrity.tokenizer_problem)."""
    root = os.fspath(tokenizer_dir)
    return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(root, n))]

# Written beside tokenizer.model for transformers. add_bos/eos false: our data pipeline adds
# EOS itself, and encode() must return the same ids as sentencepiece's encode().
_HF_CONFIG = {
    "tokenizer_class": "TokenizersBackend",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
}

# SentencePiece silently skips training sentences longer than max_sentence_length bytes,
# so long documents are cut (at newlines where possible) into chunks below this size.
_MAX_SENTENCE_BYTES = 1 << 15


class SPTokenizer:
    """Thin wrapper over ``sentencepiece.SentencePieceProcessor``.

    ``encode`` never adds BOS/EOS (the data pipeline appends EOS per document).
    """

    def __init__(self, tokenizer_dir: str, key: str = "tokenizer directory"):
        """`key` names the folder in error messages (the config check passes data.tokenizer_dir).
        Raises FileNotFoundError for a missing folder or model file, ValueError for a model file
        sentencepiece cannot read."""
        import sentencepiece as spm

        self.path = os.path.abspath(tokenizer_dir)
        model = os.path.join(self.path, MODEL_FILE)
        train = f"train one with tools/train_tokenizer.py --input FILES --out {tokenizer_dir}"
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{key} '{tokenizer_dir}' does not exist; pass a folder with {MODEL_FILE} "
                                    f"({train}) or use the bundled assets/tokenizer")
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{key} '{tokenizer_dir}' has no {MODEL_FILE}; pass a SentencePiece tokenizer "
                                    f"folder ({train}) or use the bundled assets/tokenizer")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise ValueError(f"{key} '{tokenizer_dir}': {MODEL_FILE} is not a SentencePiece model "
                             f"({' '.join(str(e).split())[:120]}); retrain it with tools/train_tokenizer.py") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding rows a model needs)."""
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def checksum(self) -> str:
        return tokenizer_checksum(self.path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text; sentencepiece parallelizes over ``num_threads``."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor/array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"SPTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``, read by the ``tokenizers`` library, and
    ``tokenizer_config.json`` for the special tokens), with SPTokenizer's interface: ``encode``
    adds no special tokens, so ids equal ``AutoTokenizer``'s with ``add_special_tokens=False``."""

    def __init__(self, tokenizer_dir: str, key: str = "tokenizer directory"):
        from tokenizers import Tokenizer

        self.path = os.path.abspath(tokenizer_dir)
        try:
            self.tok = Tokenizer.from_file(os.path.join(self.path, HF_FILE))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
            raise ValueError(f"{key} '{tokenizer_dir}': {HF_FILE} does not load with the tokenizers library "
                             f"({' '.join(str(e).split())[:120]}); pass a folder saved by save_pretrained") from None
        config_file = os.path.join(self.path, "tokenizer_config.json")
        try:
            with open(config_file) as f:
                config = json.load(f) if os.path.isfile(config_file) else {}
        except ValueError:
            raise ValueError(f"{key} '{tokenizer_dir}': tokenizer_config.json is not JSON; pass a folder saved "
                             f"by save_pretrained") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

        def token_id(name: str) -> int:
            token = config.get(name)
            if isinstance(token, dict):  # an AddedToken serialized with its flags
                token = token.get("content")
            found = self.tok.token_to_id(token) if isinstance(token, str) else None
            return -1 if found is None else int(found)

        self._ids = {name: token_id(f"{name}_token") for name in ("bos", "eos", "pad", "unk")}
        if self._ids["eos"] < 0:
            # Documents are packed with an end-of-document id between them.
            raise ValueError(f"{key} '{tokenizer_dir}': tokenizer_config.json names no eos_token that "
                             f"{HF_FILE} holds; set eos_token in tokenizer_config.json")

    vocab_size = property(lambda self: self._vocab_size, doc="Number of ids (embedding rows a model needs).")
    bos_id = property(lambda self: self._ids["bos"])
    eos_id = property(lambda self: self._ids["eos"])
    pad_id = property(lambda self: self._ids["pad"])
    unk_id = property(lambda self: self._ids["unk"])
    checksum = property(lambda self: tokenizer_checksum(self.path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (the library parallelizes on its own; num_threads is unused)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a tokenizer load_tokenizer reads (tokenizer.model or tokenizer.json)."""
    return any(os.path.isfile(os.path.join(os.fspath(folder), n)) for n in (MODEL_FILE, HF_FILE))


def load_tokenizer(tokenizer_dir: str, key: str = "tokenizer directory") -> "SPTokenizer | HFTokenizer":
    """``<tokenizer_dir>/tokenizer.model`` as an :class:`SPTokenizer`, else ``tokenizer.json`` as an
    :class:`HFTokenizer`."""
    if os.path.isdir(tokenizer_dir) and not os.path.isfile(os.path.join(tokenizer_dir, MODEL_FILE)):
        if os.path.isfile(os.path.join(tokenizer_dir, HF_FILE)):
            return HFTokenizer(tokenizer_dir, key)
        raise FileNotFoundError(f"{key} '{tokenizer_dir}' has no {MODEL_FILE} or {HF_FILE}; pass a SentencePiece "
                                f"or Hugging Face tokenizer folder (train one with tools/train_tokenizer.py "
                                f"--input FILES --out {tokenizer_dir}) or use the bundled assets/tokenizer")
    return SPTokenizer(tokenizer_dir, key)


def tokenizer_checksum(tokenizer_dir: str) -> str:
    """sha256 hex digest of ``<tokenizer_dir>/tokenizer.model``, or of ``tokenizer.json`` when there
    is no tokenizer.model (identifies the vocabulary)."""
    h = hashlib.sha256()
    name = MODEL_FILE if os.path.isfile(os.path.join(tokenizer_dir, MODEL_FILE)) else HF_FILE
    with open(os.path.join(tokenizer_dir, name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    """sha256 over every tokenizer file present (tokenizer_files: tokenizer.model and a Hugging
    Face tokenizer.json, its configs, ...), names included: what a resume compares. Not
    tokenizer_checksum, which prepared data records and which must stay the sha256 of
    tokenizer.model alone so that data prepared earlier still matches."""
    h = hashlib.sha256()
    for name in tokenizer_files(tokenizer_dir):
        h.update(name.encode() + b"\0")
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _training_sentences(docs: Iterable[str], max_bytes: int = _MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Yield documents whole, cutting ones longer than ``max_bytes`` at line boundaries."""
    for doc in docs:
        if not doc:
            continue
        if len(doc.encode("utf-8")) <= max_bytes:
            yield doc
            continue
        chunk, size = [], 0
        for line in doc.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if chunk and size + n > max_bytes:
                yield "".join(chunk)
                chunk, size = [], 0
            if n > max_bytes:  # a single huge line: hard cut (4 bytes/char worst case)
                step = max_bytes // 4
                for i in range(0, len(line), step):
                    yield line[i:i + step]
                continue
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


# Enough text for a 32k vocabulary; ~0.8 GB of SentencePiece's memory at ~3 bytes per byte (train_tokenizer).
DEFAULT_SAMPLE_MB = 256.0


def _sampled_texts(docs, sample_docs: int = 0, sample_mb: float = 0.0, seed: int = 0) -> Iterator[str]:
    """Stream the documents' texts from their Arrow table in batches (``docs["text"]`` would build
    the whole column as Python strings), keeping a uniform random sample of documents when the
    corpus has more than ``sample_docs`` documents or ``sample_mb`` MB of text (0 = no cap). The
    sample is drawn from ``seed`` and read in corpus order, so the same inputs train the same
    tokenizer; a corpus under both caps is read whole, exactly as before sampling existed."""
    import numpy as np
    import pyarrow.compute as pc

    n = len(docs)
    keep = n
    if sample_docs > 0:
        keep = min(keep, sample_docs)
    if sample_mb > 0:  # the text's UTF-8 bytes from the Arrow offsets: no string is built
        total = sum(pc.sum(pc.binary_length(t["text"])).as_py() or 0
                    for t in docs.with_format("arrow").iter(batch_size=100_000))
        if total > sample_mb * 1e6:
            keep = min(keep, max(1, int(n * sample_mb * 1e6 / total)))
    if keep < n:
        docs = docs.select(np.sort(np.random.default_rng(seed).choice(n, size=keep, replace=False)))
    for batch in docs.iter(batch_size=1000):
        yield from batch["text"]


def train_tokenizer(inputs: list[str], out_dir: str, vocab_size: int = 8000,
                    model_type: str = "bpe", text_field: str = "text",
                    txt_split: str = "paragraph", input_sentence_size: int = 1_000_000,
                    character_coverage: float = 1.0, num_threads: int | None = None,
                    sample_docs: int = 0, sample_mb: float = DEFAULT_SAMPLE_MB) -> str:
    """Train a SentencePiece model on ``inputs`` and write it to ``out_dir``.

    ``inputs``: local .txt / .jsonl / .json / .jsonl.xz / .parquet files, read with the same
    document semantics as :func:`relora_dist.data.documents.load_documents` (``text_field`` for
    json/parquet, ``txt_split`` for text files). ``sample_docs`` / ``sample_mb`` bound what is
    read into memory to a seeded uniform sample of documents (:func:`_sampled_texts`; 0 = no
    cap): SentencePiece keeps every sentence it trains on, ~3 bytes of memory per byte of text
    (measured on 234 MB of jsonl, the bundled corpus repeated: peak RSS 1.31 GB unsampled,
    0.88 GB at sample_mb=100, 0.73 GB at 50). What else grows with the corpus is the
    memory-mapped Arrow cache datasets reads it from (292 of the 475 MB resident after loading
    those 234 MB: file pages the kernel can drop). ``input_sentence_size`` then caps how many
    training sentences sentencepiece samples (0 = all). Writes ``tokenizer.model`` and
    ``tokenizer_config.json``; returns the path of ``tokenizer.model``.
    """
    import sentencepiece as spm

    from relora_dist.data.documents import load_documents

    docs = load_documents(inputs, text_field=text_field, txt_split=txt_split)  # column "text"
    buf = io.BytesIO()
    # model_writer: serialize to memory so the model proto does not embed out_dir's path,
    # which would make tokenizer_checksum depend on where the tokenizer was trained.
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(_sampled_texts(docs, sample_docs, sample_mb)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,  # digit-by-digit numbers: fewer rare number pieces, llama-style
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads or min(8, os.cpu_count() or 1),
        minloglevel=2,  # silence the per-iteration training log
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(_HF_CONFIG, f, indent=2)
        f.write("\n")
    return path
