"""Data pipeline: packing, splits, distributed batching, resume, errors, caching."""
import json
import os
import pickle
import time

import numpy as np
import pydoc_data.topics
import pytest
import torch

import relora_dist.data.prepare as prepare  # where ensure_prepared (first_use.py) looks up prepare_dataset
from relora_dist.data import (DEFAULT_CORPUS, DEFAULT_TOKENIZER, BlockLoader, DataError,
                              PackedBlocks, check_tokenizer_matches, ensure_prepared,
                              eval_batches, load_documents, prepare_dataset, read_meta)
from relora_dist.data.tokenizer import load_tokenizer

DOCS = [t for t in pydoc_data.topics.topics.values() if t]  # 79 docs, ~0.46 MB
SEQ = 64
VAL = 0.1


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "topics.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return str(path)


@pytest.fixture(scope="module")
def prepared(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep"))
    meta = prepare_dataset([src], DEFAULT_TOKENIZER, out, SEQ, val_fraction=VAL, seed=7)
    return out, meta


def split_docs(split):
    """Reference: documents of a split, in corpus order (from the seeded document mask)."""
    mask = prepare._val_mask(len(DOCS), VAL, 7)
    return [d for d, v in zip(DOCS, mask) if v == (split == "val")]


def test_packing_round_trip(prepared, tok):
    out, meta = prepared
    for split in ("train", "val"):
        blocks = PackedBlocks(out, split, SEQ)
        assert len(blocks) == meta["num_blocks"][split] > 0
        flat = torch.cat([blocks[i] for i in range(len(blocks))]).tolist()
        expected = [i for d in split_docs(split) for i in tok.encode(d) + [tok.eos_id]]
        assert meta["num_tokens"][split] == len(expected)
        assert len(flat) == len(expected) // SEQ * SEQ  # only the partial tail is dropped
        assert flat == expected[:len(flat)]
        # Decoding the EOS-separated pieces gives back the split's documents, in order.
        pieces = np.split(np.array(flat), np.flatnonzero(np.array(flat) == tok.eos_id) + 1)
        whole = [tok.decode(p[:-1]) for p in pieces if len(p) and p[-1] == tok.eos_id]
        assert whole == split_docs(split)[:len(whole)] and len(whole) >= len(split_docs(split)) - 1


def test_splits_disjoint_by_document(prepared):
    out, meta = prepared
    train, val = split_docs("train"), split_docs("val")
    assert meta["num_documents"] == {"train": len(train), "val": len(val)}
    assert len(val) == round(len(DOCS) * VAL) and not set(train) & set(val)
    assert sorted(train + val) == sorted(DOCS)
    assert prepare._val_mask(50, 0.2, 1).tolist() == prepare._val_mask(50, 0.2, 1).tolist()
    assert prepare._val_mask(50, 0.2, 1).tolist() != prepare._val_mask(50, 0.2, 2).tolist()


def test_uint16_when_vocab_fits(prepared):
    out, meta = prepared
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 8000
    assert os.path.getsize(os.path.join(out, "train.bin")) == meta["num_blocks"]["train"] * SEQ * 2
    assert prepare._dtype_for(65536) == np.uint16 and prepare._dtype_for(65537) == np.uint32
    assert PackedBlocks(out, "train", SEQ)[0].dtype == torch.int64


def steps(loader, n):
    return [torch.cat(loader.next_batch()) for _ in range(n)]


@pytest.mark.parametrize("mb,ga,ws", [(2, 1, 2), (1, 2, 2), (1, 1, 4), (2, 2, 2)])
def test_ranks_union_equals_single_rank(prepared, mb, ga, ws):
    blocks = PackedBlocks(prepared[0], "train", SEQ)
    G = mb * ga * ws
    single = BlockLoader(blocks, micro_batch_size=mb, grad_accum=ga * ws, rank=0, world_size=1, seed=3)
    ranks = [BlockLoader(blocks, mb, ga, r, ws, seed=3) for r in range(ws)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == len(blocks) // G
    for _ in range(5):
        per_rank = [r.next_batch() for r in ranks]
        assert all(len(b) == ga and all(x.shape == (mb, SEQ) for x in b) for b in per_rank)
        cat = [torch.cat(b) for b in per_rank]
        for i in range(ws):  # disjoint: no rank shares a block with another
            for j in range(i + 1, ws):
                assert not (cat[i][:, None] == cat[j][None]).all(-1).any()
        assert torch.equal(torch.cat(cat), torch.cat(single.next_batch()))


def test_resume_exact_and_epochs(prepared):
    blocks = PackedBlocks(prepared[0], "val", SEQ)  # small split: several epochs quickly
    mk = lambda seed=5: BlockLoader(blocks, 4, 2, 0, 1, seed)  # noqa: E731
    a = mk()
    spe = a.steps_per_epoch
    assert spe >= 2
    epoch0 = steps(a, spe)
    assert a.state_dict() == {"epoch": 1, "step_in_epoch": 0}
    epoch1 = steps(a, spe)
    # deterministic given the seed, different order across epochs and seeds
    assert all(torch.equal(x, y) for x, y in zip(epoch0 + epoch1, steps(mk(), 2 * spe)))
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, epoch1))
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, steps(mk(seed=6), spe)))
    # no block repeats within an epoch
    rows = torch.cat(epoch0)
    assert len({tuple(r.tolist()) for r in rows}) == len(rows) == spe * 8
    # resume from mid-epoch 1 (crossing into epoch 2) gives exactly the same batches
    b = mk()
    steps(b, spe + 1)
    state = b.state_dict()
    assert state == {"epoch": 1, "step_in_epoch": 1}
    expected = steps(b, spe + 1)
    c = mk()
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, steps(c, spe + 1)))


def test_eval_batches_disjoint_and_deterministic(prepared):
    blocks = PackedBlocks(prepared[0], "val", SEQ)
    one = torch.cat(list(eval_batches(blocks, 2, 0, 1, max_blocks=11)))
    assert torch.equal(one, blocks.get_batch(range(10)))  # rounded down to a multiple of 2
    shares = [list(eval_batches(blocks, 2, r, 3, max_blocks=13)) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2]  # 13 -> 12 blocks, 4 per rank
    assert torch.equal(torch.cat([torch.cat(s) for s in shares]), blocks.get_batch(range(12)))
    everything = list(eval_batches(blocks, 1, 0, 1, max_blocks=None))
    assert len(everything) == len(blocks)


def one_line_error(fn, *needles):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    for n in needles:
        assert n in msg, msg


def test_data_errors(prepared, src, tmp_path):
    out, _ = prepared
    one_line_error(lambda: PackedBlocks(str(tmp_path / "nope"), "train", SEQ),
                   "does not exist", "tools/prepare_data.py")
    one_line_error(lambda: PackedBlocks(str(tmp_path), "train", SEQ),
                   "meta.json", "tools/prepare_data.py")
    one_line_error(lambda: PackedBlocks(out, "train", 2 * SEQ), "longer", "--seq_len 128")
    one_line_error(lambda: PackedBlocks(out, "train", 48), "does not divide", "--seq_len 48")
    one_line_error(lambda: PackedBlocks(out, "test", SEQ), "unknown split", "train", "val")
    one_line_error(lambda: check_tokenizer_matches(out, 32000), "8000", "32000", "vocab_size")
    check_tokenizer_matches(out, 8000, tokenizer_dir=DEFAULT_TOKENIZER)
    val = PackedBlocks(out, "val", SEQ)
    one_line_error(lambda: BlockLoader(val, len(val), 1, 0, 2, 0), "fewer than one global batch")
    one_line_error(lambda: eval_batches(val, len(val), 0, 2, None), "val_fraction")
    one_line_error(lambda: load_documents([str(tmp_path / "x.csv")]), "not found")
    one_line_error(lambda: prepare_dataset([src], DEFAULT_TOKENIZER, str(tmp_path / "o"), SEQ,
                                           text_field="body"), "--text_field")


def test_shorter_divisor_seq_len_splits_blocks(prepared):
    full, half = PackedBlocks(prepared[0], "train", SEQ), PackedBlocks(prepared[0], "train", SEQ // 2)
    assert len(half) == 2 * len(full)
    assert torch.equal(torch.cat([half[6], half[7]]), full[3])
    again = pickle.loads(pickle.dumps(full))  # small pickle: the memmap is re-opened, not copied
    assert len(pickle.dumps(full)) < 10_000 and torch.equal(again[3], full[3])


def test_ensure_prepared_caches(src, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    d1 = ensure_prepared([src], DEFAULT_TOKENIZER, cache, SEQ, 0.1, 7)
    mtime = os.path.getmtime(os.path.join(d1, "meta.json"))
    assert read_meta(d1)["num_blocks"]["train"] > 0
    calls = []
    monkeypatch.setattr(prepare, "prepare_dataset", lambda **kw: calls.append(kw) or {})
    assert ensure_prepared([src], DEFAULT_TOKENIZER, cache, SEQ, 0.1, 7) == d1
    assert calls == [] and os.path.getmtime(os.path.join(d1, "meta.json")) == mtime
    monkeypatch.undo()
    d2 = ensure_prepared([src], DEFAULT_TOKENIZER, cache, SEQ // 2, 0.1, 7)  # new key
    assert d2 != d1 and read_meta(d2)["seq_len"] == SEQ // 2
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched source -> new key
    d3 = ensure_prepared([src], DEFAULT_TOKENIZER, cache, SEQ, 0.1, 7)
    assert d3 not in (d1, d2)
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(d) for d in (d1, d2, d3))


def _dist_worker(rank, world, init, src, cache, results):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    real = prepare.prepare_dataset
    prepare.prepare_dataset = lambda **kw: calls.append(1) or real(**kw)
    path = ensure_prepared([src], DEFAULT_TOKENIZER, cache, SEQ, 0.1, 7)
    results[rank] = (path, len(calls), read_meta(path)["num_blocks"]["train"])
    torch.distributed.destroy_process_group()


@pytest.mark.spawn
def test_ensure_prepared_distributed_only_rank0_prepares(src, tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_dist_worker, args=(2, init, src, str(tmp_path / "cache"), results), nprocs=2)
    (p0, calls0, n0), (p1, calls1, n1) = results[0], results[1]
    assert p0 == p1 and n0 == n1 > 0 and (calls0, calls1) == (1, 0)


def test_text_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "a.txt"
    txt.write_text("first para\nline two\n\n\nsecond para\n\n  third  \n")
    assert list(load_documents([str(txt)])["text"]) == ["first para\nline two", "second para",
                                                        "  third  "]
    assert len(load_documents([str(txt)], txt_split="document")) == 1
    pq.write_table(pa.table({"body": ["p1", "", "p2"]}), tmp_path / "b.parquet")
    docs = load_documents([str(txt), str(tmp_path / "b.parquet")], text_field="body")
    assert list(docs["text"])[-2:] == ["p1", "p2"] and len(docs) == 5


def test_bundled_corpus():
    assert os.path.getsize(DEFAULT_CORPUS) < 2.5e6
    docs = load_documents([DEFAULT_CORPUS])
    assert len(docs) == 1189 and docs[0]["text"].startswith("Genesis 1\n\nIn the beginning")
