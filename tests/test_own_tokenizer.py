"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json, no tokenizer.model) through
relora-prepare-data, the prepare-on-first-use cache, training from model.init_from (whose own
tokenizer is the default), checkpoints and the export AutoTokenizer loads; and the one-line errors
of a model folder that does not fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import REPO
from tests.test_own_model import make_model

TEXT = "In the beginning God created the heaven and the earth.\nAnd the earth was without form."


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(args: list[str], rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 chapters of the bundled corpus as jsonl."""
    from relora_dist.data import DEFAULT_CORPUS, load_documents

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = load_documents([str(DEFAULT_CORPUS)])["text"][:200]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def hf_tok(corpus, tmp_path_factory) -> Path:
    """A byte-level BPE trained with the `tokenizers` library and saved by transformers: tokenizer.json
    and tokenizer_config.json only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("hf_tok")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").is_file()
    return out


@pytest.mark.spawn
def test_hf_tokenizer_prepare_train_export(hf_tok, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relora_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(hf_tok))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and tok.eos_id == 2 and tok.vocab_size == 512
    # relora-prepare-data with it
    _run([str(REPO / "tools/prepare_data.py"), "--input", str(corpus), "--tokenizer", str(hf_tok),
          "--out", str(tmp_path / "prepared"), "--seq_len", "32"])
    # a tied qwen2 whose folder holds that tokenizer: the run's default tokenizer
    model_dir = make_model(tmp_path / "model", "qwen2", tokenizer=hf_tok, vocab_size=512, num_key_value_heads=2,
                           tie_word_embeddings=True)
    run = tmp_path / "run"
    args = ["launchers/pretrain.py", "--init_from", str(model_dir), f"--data.sources={corpus}",
            f"--data.cache_dir={tmp_path / 'cache'}", "--data.seq_len=32", "--train.global_batch_size=8",
            "--train.micro_batch_size=4", "--train.eval_tokens=256", "--train.precision=fp32",
            "--relora.warm_start_steps=4", "--relora.cycle_length=4", "--relora.first_warmup=1",
            "--relora.restart_warmup=1", "--relora.r=8", "--train.max_steps=16", "--run.export_warm_start=true",
            f"--run.output_dir={run}", "--logging.progress_bar=false"]
    stdout = _run(args).stdout
    assert "reset 2" in stdout
    # the cache prepared exactly what relora-prepare-data did, keyed on this tokenizer
    (cached,) = [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]
    for split in ("train.bin", "val.bin"):
        assert (cached / split).read_bytes() == (tmp_path / "prepared" / split).read_bytes()
    assert json.loads((cached / "meta.json").read_text())["vocab_size"] == 512
    ckpt_tok = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "tokenizer"
    assert sorted(p.name for p in ckpt_tok.iterdir()) == sorted(p.name for p in hf_tok.iterdir())
    out = tmp_path / "hf"
    _run([str(REPO / "tools/convert_ckpt.py"), str(run / "checkpoints"), str(out)])
    for folder in (out, run / "warm_start"):
        auto = AutoTokenizer.from_pretrained(folder)
        assert auto(TEXT, add_special_tokens=False).input_ids == ids
        assert auto.decode(ids) == TEXT and auto.eos_token_id == tok.eos_id
        assert (folder / "tokenizer.json").read_bytes() == (hf_tok / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 512 and model.config.tie_word_embeddings
    # resuming the finished run reads the checkpoint's tokenizer fingerprint and says so
    assert "nothing to do" in _run(args).stdout


def _validate(**overrides):
    from relora_dist.config import load_config
    from relora_dist.validation import validate

    validate(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, hf_tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    out["gpt2"] = make_model(root / "gpt2", "llama")
    cfg = json.loads((out["gpt2"] / "config.json").read_text())
    (out["gpt2"] / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    out["untied_cfg"] = make_model(root / "untied_cfg", "llama", tie_word_embeddings=True)  # no lm_head.weight
    cfg = json.loads((out["untied_cfg"] / "config.json").read_text())
    (out["untied_cfg"] / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    out["tied_cfg"] = make_model(root / "tied_cfg", "llama")  # lm_head.weight differs from the embedding
    cfg = json.loads((out["tied_cfg"] / "config.json").read_text())
    (out["tied_cfg"] / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    out["small"] = make_model(root / "small", "llama", tokenizer=hf_tok, vocab_size=500)  # fewer rows than ids
    return out


# the messages; the launcher's exit 2 with one line and nothing written: tests/test_bad_inputs.py
ERRORS = {
    "unsupported model_type": ("gpt2", {}, ["'gpt2' model", "llama, mistral, qwen2"]),
    "config untied, weights tied": ("untied_cfg", {}, ["tie_word_embeddings false", "no lm_head.weight"]),
    "config tied, weights untied": ("tied_cfg", {}, ["tie_word_embeddings true", "differs"]),
    "tokenizer has more ids than rows": ("small", {}, ["vocab_size 500", "has 512 ids"]),
}


@pytest.mark.parametrize("case", [c for c in ERRORS if ERRORS[c][2]])
def test_init_from_errors(case, folders, tmp_path):
    from relora_dist.config import ConfigError

    name, extra, needles = ERRORS[case]
    with pytest.raises(ConfigError) as ei:
        _validate(**{"model.init_from": folders[name], "run.output_dir": tmp_path / "run", **extra})
    msg = str(ei.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_explicit_tokenizer_vocab_differs(folders, hf_tok, tmp_path):
    """An explicit data.tokenizer_dir must match the model's embedding rows exactly."""
    from relora_dist.config import ConfigError

    with pytest.raises(ConfigError, match="vocab_size 8000 .* has 512 ids"):
        _validate(**{"model.init_from": make_model(tmp_path / "m", "llama"), "data.tokenizer_dir": hf_tok,
                     "run.output_dir": tmp_path / "run"})


def test_tied_lm_head_is_no_target(folders, tmp_path):
    from relora_dist.config import ConfigError

    tied = make_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="drop lm_head from relora.targets"):
        _validate(**{"model.init_from": tied, "data.tokenizer_dir": folders["gpt2"], "run.output_dir": tmp_path / "r",
                     "relora.enabled": True, "relora.targets": "self_attn\\.q_proj$,lm_head"})
