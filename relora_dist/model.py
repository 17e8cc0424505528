"""LLaMA-style model presets built as `transformers.LlamaForCausalLM`, and the Hugging Face folders
(model.init_from) a run may start from.

Dimensions follow the reference repo's configs (Guitaricet/relora `configs/llama_*.json`); the
vocabulary size always comes from the tokenizer. Model code knows nothing about parallelism.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from relora_dist.config import ConfigError, suggest
from relora_dist.data.tokenizer import has_tokenizer


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    max_seq_len: int = 1024


PRESETS: dict[str, Preset] = {
    # Debug model: fast enough for 2-process tests and the 5-minute default run on 2 CPU cores.
    "tiny": Preset(128, 344, 4, 2),
    # ~20.8M with an 8k vocabulary: the model the CPU benchmarks use.
    "20m": Preset(512, 1376, 8, 4),
    "60m": Preset(512, 1376, 8, 8),
    "130m": Preset(768, 2048, 12, 12),
    "250m": Preset(768, 2560, 16, 24),
    "350m": Preset(1024, 2736, 16, 24),
    "1b3": Preset(2048, 5461, 32, 24),
    # Not a paper size: the shape the memory model reports for 7B-class LLaMA.
    "7b": Preset(4096, 11008, 32, 32, 2048),
}


def llama_config(
    preset: str,
    vocab_size: int,
    seq_len: int,
    hidden_size: int = 0,
    intermediate_size: int = 0,
    num_layers: int = 0,
    num_heads: int = 0,
) -> LlamaConfig:
    """LlamaConfig for a preset; non-zero keyword values override the preset's dimensions. Raises
    ValueError naming the model.* keys (check_model_config reports it as a ConfigError)."""
    if preset not in PRESETS:
        raise ValueError(f"model.preset '{preset}' unknown: {suggest(preset, list(PRESETS))}")
    for key, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                       ("num_layers", num_layers), ("num_heads", num_heads)):
        if value < 0:
            raise ValueError(f"model.{key}={value} must be >= 0 (0 = the preset's value)")
    p = PRESETS[preset]
    hidden = hidden_size or p.hidden_size
    heads = num_heads or p.num_heads
    if hidden % heads:
        raise ValueError(f"model.hidden_size={hidden} is not divisible by model.num_heads={heads} (model.preset="
                         f"{preset}); change model.num_heads or model.hidden_size")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate_size or p.intermediate_size,
        num_hidden_layers=num_layers or p.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(seq_len, p.max_seq_len),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attn_implementation="sdpa",
    )


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

#: Hugging Face causal LMs of the LLaMA linear layout (q/k/v/o and gate/up/down projections, RMSNorm,
#: embeddings and lm_head, tied or not) that model.init_from is tested with; qwen2's q/k/v biases stay
#: in the frozen base, the adapters wrap the Linear.
MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_dict(d: dict):
    """A transformers config from its to_dict() (a manifest's model_config): its model_type's class,
    LLaMA for manifests written before the model type was recorded."""
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type", None) or "llama", **d)


def _weight_names(folder: Path) -> set[str] | None:
    """Tensor names of a safetensors folder (headers only), None for other formats."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    if (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return set(f.keys())
    return None


def _check_tied(folder: Path, tied: bool) -> None:
    """config.json's tie_word_embeddings against the weights: untied needs an lm_head.weight
    (transformers would draw a random one), tied needs none or the embedding's values."""
    names = _weight_names(folder)
    if names is None or "model.embed_tokens.weight" not in names:
        return
    fix = f"fix tie_word_embeddings in {folder / 'config.json'}"
    if not tied and "lm_head.weight" not in names:
        raise ConfigError(f"model.init_from '{folder}': config.json has tie_word_embeddings false but the weights "
                          f"hold no lm_head.weight (a tied model); {fix}")
    if tied and "lm_head.weight" in names:
        from safetensors import safe_open

        files = ([folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else
                 [folder / f for f in set(json.loads((folder / "model.safetensors.index.json").read_text())
                                          ["weight_map"][k] for k in ("lm_head.weight", "model.embed_tokens.weight"))])
        found = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                found.update({k: f.get_tensor(k) for k in ("lm_head.weight", "model.embed_tokens.weight")
                              if k in f.keys()})
        if len(found) == 2 and not torch.equal(found["lm_head.weight"], found["model.embed_tokens.weight"]):
            raise ConfigError(f"model.init_from '{folder}': config.json has tie_word_embeddings true but the weights' "
                              f"lm_head.weight differs from model.embed_tokens.weight (an untied model); {fix}")


def check_model_config(cfg, vocab_size: int):
    """The transformers config the run builds, or a ConfigError: the preset's LlamaConfig with its
    overrides, or the config of a complete Hugging Face folder (model.init_from) of a tested
    model type whose vocabulary matches the tokenizer's and whose tying matches its weights."""
    m = cfg.model
    if not m.init_from:
        try:
            return llama_config(m.preset, vocab_size, cfg.data.seq_len, m.hidden_size, m.intermediate_size,
                                m.num_layers, m.num_heads)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    folder = Path(m.init_from)
    hf = "pass a Hugging Face model folder (e.g. a run's <output_dir>/warm_start"
    if not folder.is_dir():
        raise ConfigError(f"model.init_from '{folder}' is not a folder; {hf}) or leave model.init_from empty for a "
                          f"random init")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.init_from '{folder}' has no config.json; {hf}, written by save_pretrained)")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"model.init_from '{folder}' has config.json but no weights ({', '.join(WEIGHT_FILES)}); "
                          f"pass a complete Hugging Face model folder (e.g. a run's <output_dir>/warm_start)")
    try:
        raw = json.loads((folder / "config.json").read_text())
        model_vocab = int(raw["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.init_from '{folder}': config.json is unreadable or has no vocab_size "
                          f"({type(e).__name__}); pass a Hugging Face model folder") from None
    if raw.get("model_type") not in MODEL_TYPES:
        raise ConfigError(f"model.init_from '{folder}' is a '{raw.get('model_type')}' model; model_type must be one "
                          f"of {', '.join(MODEL_TYPES)} (the tested LLaMA-layout architectures)")
    own = not cfg.data.tokenizer_dir or Path(cfg.data.tokenizer_dir).resolve() == folder.resolve()
    if not cfg.data.tokenizer_dir and not has_tokenizer(folder):
        raise ConfigError(f"model.init_from '{folder}' holds weights but no tokenizer (tokenizer.model or "
                          f"tokenizer.json); set data.tokenizer_dir to the tokenizer the model was trained with")
    # The model's own tokenizer may have fewer ids than embedding rows (rows padded to a multiple,
    # as Qwen2 ships them); any other tokenizer must match the rows exactly.
    if model_vocab < vocab_size or (model_vocab != vocab_size and not own):
        tok_dir = cfg.data.tokenizer_dir or folder
        raise ConfigError(
            f"model.init_from '{folder}' has vocab_size {model_vocab} (embedding rows) but data.tokenizer_dir "
            f"({tok_dir}) has {vocab_size} ids; set data.tokenizer_dir to the tokenizer the model was trained "
            f"with (an exported folder holds it: data.tokenizer_dir={folder})")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises various errors for bad configs
        raise ConfigError(f"model.init_from '{folder}': config.json does not load as a {raw['model_type']} config "
                          f"({' '.join(str(e).split())[:120]}); pass a Hugging Face model folder") from None
    _check_tied(folder, bool(config.tie_word_embeddings))
    return config


def build_model(config, seed: int, init_from: str = "") -> torch.nn.Module:
    """Random init from `seed` (identical on every rank), or weights from a HF folder, in fp32."""
    if init_from:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) as in the PaLM appendix B / nanoGPT:
    6 * non-embedding matmul params (k/v at their grouped-query size) + 6 * lm_head
    + 12 * layers * heads * head_dim * seq_len (attention). MFU uses this "model FLOPs" count in
    both phases so the figures stay comparable."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    q = heads * (getattr(config, "head_dim", None) or h // heads)
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (q // heads)  # GQA: fewer k/v rows
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i
    return 6.0 * (L * per_layer + h * config.vocab_size) + 12.0 * L * q * seq_len
