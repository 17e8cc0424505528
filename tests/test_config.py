"""Config parsing (YAML, dotted overrides, types, the launcher's argv forms, round trip, docs) and
every validation error: a ValueError with one line that names the key and the fix."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from relora_dist.config import SECTIONS, Config, ConfigError, dump_config, field_docs, help_text, load_config
from relora_dist.validation import validate
from relora_dist.data import DEFAULT_TOKENIZER

REPO = Path(__file__).resolve().parent.parent
FIX_WORDS = ("use ", "pass ", "set ", "run ", "change ", "lower ", "raise ", "fix ", "delete ", "rename ",
             "write ", "did you mean", "leave ", "re-prepare", "give ", "must be")


def _launcher():
    spec = importlib.util.spec_from_file_location("pretrain_launcher", REPO / "launchers" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def every_key() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# --- parsing ---------------------------------------------------------------------------------------

def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"max_steps": 40, "precision": "fp32"},
                                 "relora": {"r": 4, "targets": ["q_proj$", "v_proj$"]}}))
    cfg = load_config(str(p), ["--train.max_steps=60", "relora.alpha=8"])
    assert cfg.train.max_steps == 60 and cfg.train.precision == "fp32"  # override wins, YAML kept
    assert cfg.relora.r == 4 and cfg.relora.alpha == 8.0 and cfg.relora.targets == ["q_proj$", "v_proj$"]
    assert cfg.train.global_batch_size == Config().train.global_batch_size  # default untouched


@pytest.mark.parametrize("item, key, value", [
    ("train.max_steps=12", "train.max_steps", 12),
    ("train.max_steps=12.0", "train.max_steps", 12),
    ("optimizer.lr=1e-3", "optimizer.lr", 1e-3),  # YAML 1.1 reads this as a string
    ("optimizer.lr=0.002", "optimizer.lr", 0.002),
    ("optimizer.lr=1", "optimizer.lr", 1.0),
    ("relora.enabled=false", "relora.enabled", False),
    ("relora.enabled=True", "relora.enabled", True),
    ("relora.targets=q_proj$,v_proj$", "relora.targets", ["q_proj$", "v_proj$"]),
    ("relora.targets=[q_proj$, k_proj$]", "relora.targets", ["q_proj$", "k_proj$"]),
    ("data.sources=", "data.sources", []),
    ("run.output_dir=runs/x", "run.output_dir", "runs/x"),
    ("model.init_from=", "model.init_from", ""),
])
def test_override_type_coercion(item, key, value):
    cfg = load_config(None, [item])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("item, needles", [
    ("train.max_steps=abc", ["train.max_steps", "integer", "'abc'", "write e.g."]),
    ("train.max_steps=2.5", ["train.max_steps", "integer"]),
    ("optimizer.lr=fast", ["optimizer.lr", "number", "write e.g."]),
    ("relora.enabled=maybe", ["relora.enabled", "true/false", "write "]),
    ("train.max_steps", ["train.max_steps", "needs a value", "write "]),
    ("train.max_step=3", ["unknown config key 'train.max_step'", "did you mean 'max_steps'?"]),
    ("relora.rank=3", ["unknown config key 'relora.rank'", "use one of alpha, base_quant, carry_optimizer_state, cycle_length"]),
    ("relora.warmstart_steps=3", ["unknown config key 'relora.warmstart_steps'",
                                  "did you mean 'warm_start_steps'?"]),
    ("trian.max_steps=3", ["unknown config section 'trian'", "did you mean 'train'?"]),
    ("max_steps=3", ["'max_steps' is not of the form section.key"]),
])
def test_bad_overrides(item, needles):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [item])
    msg = str(ei.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bad_yaml_files(tmp_path):
    cases = {"missing.yaml": None, "bad.yaml": "train: [1, 2\n", "list.yaml": "- 1\n- 2\n",
             "flat.yaml": "train: 3\n", "typo.yaml": "train:\n  max_stpes: 3\n"}
    needles = {"missing.yaml": "not found", "bad.yaml": "not valid YAML", "list.yaml": "must map sections",
               "flat.yaml": "must be a mapping", "typo.yaml": "did you mean 'max_steps'"}
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(ConfigError) as ei:
            load_config(str(p))
        assert needles[name] in str(ei.value) and "\n" not in str(ei.value), name


def test_launcher_parse_args_forms():
    parse_args = _launcher().parse_args
    args, overrides = parse_args(["--config", "configs/default.yaml", "--train.max_steps", "20",
                                  "--relora.r=8", "--init_from", "runs/x/warm_start", "--local_rank=0"])
    assert args.config == "configs/default.yaml" and args.local_rank == 0
    assert overrides == ["--train.max_steps=20", "--relora.r=8", "--model.init_from=runs/x/warm_start"]
    cfg = load_config(None, overrides)
    assert cfg.train.max_steps == 20 and cfg.relora.r == 8 and cfg.model.init_from == "runs/x/warm_start"


@pytest.mark.parametrize("argv, needle", [
    (["--train.max_steps"], "needs a value"),                     # at the end of argv
    (["--train.max_steps", "--relora.r=8"], "needs a value"),     # followed by another flag
    (["stray"], "unexpected argument 'stray'"),
    (["--config"], "--config: expected one argument"),
])
def test_launcher_parse_args_errors(argv, needle):
    with pytest.raises(ConfigError) as ei:
        _launcher().parse_args(argv)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=60", "relora.targets=q_proj$,v_proj$", "optimizer.lr=1e-3",
                             "relora.enabled=false", "data.sources=a.txt,b.jsonl", "optimizer.name=sgd",
                             "model.init_from=runs/x"])
    dump_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(str(tmp_path / "sub" / "config.yaml")) == cfg
    dump_config(Config(), tmp_path / "default.yaml")
    assert load_config(str(tmp_path / "default.yaml")) == Config()


def test_field_docs_and_help_cover_every_key():
    docs, text = field_docs(), help_text()
    for key in every_key():
        assert docs.get(key, "").strip(), f"{key} has no docstring"
        assert f"--{key}=" in text, key
    assert set(docs) == set(every_key())


def test_shipped_presets_validate():
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(str(preset))
        if cfg.data.prepared_dir.startswith("data/c4"):  # the paper recipes name C4 prepared elsewhere
            cfg.data.prepared_dir = cfg.data.tokenizer_dir = ""
        validate(cfg)


# --- validation ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fakes(tiny_data, tmp_path_factory):
    """Broken copies of the prepared data, an HF model folder (hidden 16) and look-alikes."""
    root = tmp_path_factory.mktemp("fakes")
    out = {"data": Path(tiny_data)}

    def copy_data(name, edit_meta=None, after=None):
        d = root / name
        shutil.copytree(tiny_data, d)
        if edit_meta:
            meta = json.loads((d / "meta.json").read_text())
            edit_meta(meta)
            (d / "meta.json").write_text(json.dumps(meta))
        if after:
            after(d)
        out[name] = d

    copy_data("vocab", lambda m: m.update(vocab_size=1000))
    copy_data("checksum", lambda m: m.update(tokenizer_checksum="0" * 64))
    copy_data("format", lambda m: m.update(format_version=99))
    copy_data("truncated", after=lambda d: (d / "train.bin").write_bytes(b"\0" * 10))
    copy_data("nometa", after=lambda d: (d / "meta.json").unlink())
    copy_data("small", lambda m: m["num_blocks"].update(train=1),
              after=lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:32 * 2]))

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=16, intermediate_size=40,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(root / "hf")
    out["hf"] = root / "hf"
    out["run"] = root / "run"  # never the cwd's runs/default: a README default run may live there
    for name, vocab, weights in (("hf_vocab", 1000, True), ("hf_noweights", 8000, False)):
        d = root / name
        d.mkdir()
        cfg = json.loads((root / "hf" / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab}))
        if weights:
            (d / "model.safetensors").write_bytes(b"")
        out[name] = d
    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    (root / "table.csv").write_text("a,b\n")
    out["csv"] = root / "table.csv"
    return out


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Validation inspects run.output_dir (default: runs/default, relative to the cwd); keep it
    away from a real run that README's first command leaves in the checkout."""
    monkeypatch.chdir(tmp_path)


def _tiny(f: dict, **extra) -> list[str]:
    base = {"data.prepared_dir": str(f["data"]), "data.seq_len": 32, "train.global_batch_size": 8,
            "train.micro_batch_size": 4, "train.eval_tokens": 512, "train.max_steps": 16,
            "relora.warm_start_steps": 4, "relora.cycle_length": 4, "relora.first_warmup": 1,
            "relora.restart_warmup": 1, "relora.r": 8, "run.output_dir": str(f["run"])}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_valid_configs_pass(fakes):
    default = Config()
    default.run.output_dir = str(fakes["run"])
    validate(default)
    validate(load_config(None, _tiny(fakes)))
    validate(load_config(None, _tiny(fakes, **{"data.seq_len": 16})))  # a divisor of the prepared 32
    validate(load_config(None, _tiny(fakes, **{"model.init_from": fakes["hf"], "relora.r": 16,
                                               "data.tokenizer_dir": DEFAULT_TOKENIZER})))
    validate(load_config(None, _tiny(fakes, **{"optimizer.name": "sgd", "relora.optimizer_reset": "none"})))
    validate(load_config(None, _tiny(fakes, **{"optimizer.name": "sgd", "relora.resets": False})))
    validate(load_config(None, _tiny(fakes, **{"relora.enabled": False, "relora.r": 10**6})))


# (overrides as a function of the fakes, substrings the one-line message must contain)
CASES = {
    # values
    "unknown preset": (lambda f: ["model.preset=60M"], ["model.preset '60M'", "did you mean '60m'"]),
    "heads": (lambda f: ["model.num_heads=3"], ["model.num_heads=3", "model.hidden_size=128", "change "]),
    "negative dims": (lambda f: ["model.hidden_size=-1"], ["model.hidden_size=-1", "must be"]),
    "batch multiple": (lambda f: ["train.global_batch_size=12"], ["train.global_batch_size=12", "change "]),
    "precision": (lambda f: ["train.precision=fp16"], ["train.precision 'fp16'", "use fp32, bf16"]),
    "eval tokens": (lambda f: ["train.eval_tokens=100"], ["train.eval_tokens=100", "raise train.eval_tokens"]),
    "val fraction": (lambda f: ["data.val_fraction=0"], ["data.val_fraction=0", "must be"]),
    "optimizer name": (lambda f: ["optimizer.name=adam"], ["optimizer.name 'adam'", "did you mean 'adamw'"]),
    "sgd with reset": (lambda f: ["optimizer.name=sgd"],
                       ["optimizer reset prunes Adam moments", "use optimizer.name=adamw or "
                        "relora.optimizer_reset=none", "relora.optimizer_reset=magnitude"]),
    "lr": (lambda f: ["optimizer.lr=0"], ["optimizer.lr=0", "must be"]),
    "beta": (lambda f: ["optimizer.beta2=1"], ["optimizer.beta2=1", "must be"]),
    "warm start too long": (lambda f: ["relora.warm_start_steps=300"],
                            ["relora.warm_start_steps=300", "train.max_steps=300", "for a 300-step run pass --relora.warm_start_steps=100"]),
    "optimizer_reset": (lambda f: ["relora.optimizer_reset=prune"], ["relora.optimizer_reset 'prune'", "use "]),
    "prune ratio": (lambda f: ["relora.prune_ratio=2"], ["relora.prune_ratio=2", "must be"]),
    "prune threshold": (lambda f: ["relora.prune_threshold=median"],
                        ["relora.prune_threshold 'median'", "use kthvalue or quantile"]),
    "reinit": (lambda f: ["relora.reinit=svd"], ["relora.reinit 'svd'", "use random, gradient or project"]),
    "reinit micro-batches": (lambda f: ["relora.reinit_micro_batches=-1"],
                             ["relora.reinit_micro_batches=-1", "must be >= 0"]),
    "project with sgd": (lambda f: ["relora.reinit=project", "optimizer.name=sgd", "relora.optimizer_reset=none"],
                         ["relora.reinit=project", "use optimizer.name=adamw or relora.reinit=gradient"]),
    "merge precision": (lambda f: ["relora.merge_precision=fp16"], ["relora.merge_precision 'fp16'", "use "]),
    "merge master device": (lambda f: ["relora.merge_master_device=gpu"],
                            ["relora.merge_master_device 'gpu'", "use device or cpu"]),
    "host masters with bf16 merges": (lambda f: ["relora.merge_master_device=cpu", "relora.merge_precision=bf16"],
                                      ["merge_master_device=cpu with relora.merge_precision=bf16",
                                       "use merge_precision=fp32 or merge_master_device=device"]),
    "phase stage": (lambda f: ["relora.phase_stage=2"], ["relora.phase_stage '2'", "use same or 3"]),
    "warm start schedule": (lambda f: ["relora.warm_start_schedule=cosine"],
                            ["relora.warm_start_schedule 'cosine'", "use paper, reference or anneal"]),
    "lr restarts": (lambda f: ["relora.lr_restarts=sometimes"], ["relora.lr_restarts 'sometimes'", "use auto, true or false"]),
    "carry optimizer state": (lambda f: ["relora.carry_optimizer_state=always"],
                              ["relora.carry_optimizer_state 'always'", "use auto, true or false"]),
    "carry with sgd": (lambda f: ["relora.carry_optimizer_state=true", "optimizer.name=sgd",
                                  "relora.optimizer_reset=none"],
                       ["carry_optimizer_state=true with optimizer.name=sgd", "no Adam moments"]),
    "carry without warm start": (lambda f: ["relora.carry_optimizer_state=true", "relora.warm_start_steps=0"],
                                 ["carry_optimizer_state=true with relora.warm_start_steps=0",
                                  "use relora.carry_optimizer_state=false or auto"]),
    "alpha": (lambda f: ["relora.alpha=0"], ["relora.alpha=0", "must be"]),
    "dropout": (lambda f: ["relora.dropout=1"], ["relora.dropout=1", "must be"]),
    "relora lr": (lambda f: ["relora.lr=-1"], ["relora.lr=-1.0", "must be"]),
    "min reset lr ratio": (lambda f: ["relora.min_reset_lr_ratio=2"],
                           ["relora.min_reset_lr_ratio=2.0", "use 0 <= it <= 1"]),
    # the jagged cosine schedule
    "restart warmup >= cycle": (lambda f: ["relora.restart_warmup=50"],
                                ["relora.restart_warmup=50", "relora.cycle_length=50", "use 1 <= "
                                 "relora.restart_warmup <= 49"]),
    "restart warmup 0": (lambda f: ["relora.restart_warmup=0"], ["relora.restart_warmup=0", "use e.g."]),
    "first warmup > cycle": (lambda f: ["relora.first_warmup=60"],
                             ["relora.first_warmup=60", "use relora.first_warmup <= 50"]),
    "cycle not dividing": (lambda f: ["relora.cycle_length=60"],
                           ["relora.cycle_length=60", "train.max_steps=280 or 340", "relora.cycle_length=50 or 40"]),
    "cycle 0": (lambda f: ["relora.cycle_length=0"], ["relora.cycle_length=0", "must be"]),
    # ReLoRA targets and rank against the model's shapes
    "r too large": (lambda f: ["relora.r=200"], ["relora.r=200", "min(in, out)=128", "use relora.r <= 128"]),
    "r too large, overridden dims": (lambda f: ["relora.r=100", "model.hidden_size=256", "model.intermediate_size=64"],
                                     ["relora.r=100", "intermediate 64", "use relora.r <= 64"]),
    "r too large, init_from": (lambda f: _tiny(f, **{"model.init_from": f["hf"], "relora.r": 17,
                                                     "data.tokenizer_dir": DEFAULT_TOKENIZER}),
                               ["relora.r=17", "model.init_from=", "use relora.r <= 16"]),
    "target matches nothing": (lambda f: ["relora.targets=attn\\.query$"],
                               ["relora.targets pattern 'attn\\.query$'", "matches no nn.Linear", "fix or drop it",
                                "model.layers.N.self_attn.q_proj"]),
    "one of two targets matches nothing": (lambda f: ["relora.targets=q_proj$,ffn"],
                                           ["relora.targets pattern 'ffn'", "fix or drop it"]),
    "invalid regex": (lambda f: ["relora.targets=q_proj(", "relora.r=8"],
                      ["relora.targets pattern 'q_proj('", "not a valid regex", "fix the pattern"]),
    "no targets": (lambda f: ["relora.targets="], ["relora.targets is empty", "give "]),
    # data paths
    "missing source": (lambda f: ["data.sources=/no/such/corpus.jsonl"],
                       ["data.sources", "'/no/such/corpus.jsonl'", "not found", "pass an existing file"]),
    "unsupported source": (lambda f: [f"data.sources={f['csv']}"], ["data.sources", "table.csv", "use .txt"]),
    "missing prepared dir": (lambda f: _tiny(f, **{"data.prepared_dir": "/no/such/prepared"}),
                             ["data.prepared_dir '/no/such/prepared'", "does not exist", "run tools/prepare_data.py"]),
    "prepared dir without meta": (lambda f: _tiny(f, **{"data.prepared_dir": f["nometa"]}),
                                  ["data.prepared_dir", "no meta.json", "run tools/prepare_data.py"]),
    "prepared format": (lambda f: _tiny(f, **{"data.prepared_dir": f["format"]}),
                        ["data.prepared_dir", "data format 99", "run tools/prepare_data.py"]),
    "truncated bin": (lambda f: _tiny(f, **{"data.prepared_dir": f["truncated"]}),
                      ["data.prepared_dir", "train.bin has 10 bytes", "run tools/prepare_data.py"]),
    "too little data": (lambda f: _tiny(f, **{"data.prepared_dir": f["small"]}),
                        ["data.prepared_dir", "fewer than one global batch", "lower train.global_batch_size"]),
    "missing tokenizer dir": (lambda f: _tiny(f, **{"data.tokenizer_dir": "/no/such/tok"}),
                              ["data.tokenizer_dir '/no/such/tok'", "does not exist", "tools/train_tokenizer.py"]),
    "tokenizer dir without model": (lambda f: _tiny(f, **{"data.tokenizer_dir": f["empty"]}),
                                    ["data.tokenizer_dir", "no tokenizer.model", "pass "]),
    # sequence length vs the prepared blocks
    "seq_len longer than prepared": (lambda f: _tiny(f, **{"data.seq_len": 64}),
                                     ["data.seq_len=64", "prepared blocks (32 tokens)", "use data.seq_len=32",
                                      "--seq_len 64"]),
    "seq_len not dividing prepared": (lambda f: _tiny(f, **{"data.seq_len": 12}),
                                      ["data.seq_len=12", "does not divide", "32", "use data.seq_len="]),
    # vocabularies: prepared data vs tokenizer, model vs tokenizer
    "data vocab differs": (lambda f: _tiny(f, **{"data.prepared_dir": f["vocab"]}),
                           ["data.prepared_dir", "vocabulary of 1000", "has 8000", "pass the tokenizer"]),
    "data tokenizer differs": (lambda f: _tiny(f, **{"data.prepared_dir": f["checksum"]}),
                               ["data.prepared_dir", "different tokenizer", "checksum", "pass the tokenizer"]),
    # model.init_from
    "init_from missing": (lambda f: _tiny(f, **{"model.init_from": "/no/such/model"}),
                          ["model.init_from '/no/such/model'", "not a folder", "pass a Hugging Face"]),
    "init_from without config.json": (lambda f: _tiny(f, **{"model.init_from": f["empty"]}),
                                      ["model.init_from", "no config.json", "pass a Hugging Face"]),
    "init_from without weights": (lambda f: _tiny(f, **{"model.init_from": f["hf_noweights"]}),
                                  ["model.init_from", "no weights", "pass a complete"]),
    "init_from vocab differs": (lambda f: _tiny(f, **{"model.init_from": f["hf_vocab"],
                                                      "data.tokenizer_dir": DEFAULT_TOKENIZER}),
                                ["model.init_from", "vocab_size 1000", "has 8000", "set data.tokenizer_dir"]),
    "init_from without tokenizer": (lambda f: _tiny(f, **{"model.init_from": f["hf"]}),
                                    ["model.init_from", "no tokenizer", "set data.tokenizer_dir"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_error(case, fakes):
    overrides, needles = CASES[case]
    with pytest.raises(ValueError) as ei:  # ConfigError (a ValueError) from load_config or validate
        validate(load_config(None, [str(o) for o in overrides(fakes)]))
    msg = str(ei.value)
    assert isinstance(ei.value, ConfigError), type(ei.value)
    assert "\n" not in msg, msg
    assert all(n in msg for n in needles), (needles, msg)
    assert any(w in msg for w in FIX_WORDS), msg


def test_validate_touches_nothing(tmp_path):
    """Validation writes nothing: no run directory and no data cache."""
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    validate(cfg)
    assert list(tmp_path.iterdir()) == []


def test_bundled_tokenizer_default_matches(tiny_data):
    meta = json.loads((Path(tiny_data) / "meta.json").read_text())
    from relora_dist.data.tokenizer import tokenizer_checksum

    assert meta["tokenizer_checksum"] == tokenizer_checksum(DEFAULT_TOKENIZER)


def test_word_valued_keys_hold_their_words_however_the_config_was_made():
    """A Literal-typed key is refused at loading (CLI, YAML) and, for a Config changed in code, by
    validation's first check; every default is one of its words."""
    from relora_dist.config import check_choices

    check_choices(Config())
    cfg = Config()
    cfg.relora.merge_master_device = "gpu"
    with pytest.raises(ConfigError, match=r"relora.merge_master_device 'gpu' unknown: use device or cpu"):
        check_choices(cfg)
    with pytest.raises(ConfigError, match=r"train.precision 'bf61' unknown: use fp32, bf16 or auto \(did you mean 'bf16'\?\)"):
        load_config(None, ["train.precision=bf61"])
    assert load_config(None, ["relora.phase_stage=3", "relora.lr_restarts=true"]).relora.phase_stage == "3"
