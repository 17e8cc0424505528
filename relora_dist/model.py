"""LLaMA-style model presets built as `transformers.LlamaForCausalLM`.

Dimensions follow the reference repo's configs (Guitaricet/relora `configs/llama_*.json`); the
vocabulary size always comes from the tokenizer. Model code knows nothing about parallelism.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from relora_dist.config import ConfigError, _suggest


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
        raise ValueError(f"model.preset '{preset}' unknown: {_suggest(preset, list(PRESETS))}")
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


def check_model_config(cfg, vocab_size: int) -> LlamaConfig:
    """The LlamaConfig the run builds, or a ConfigError: the preset with its overrides, or a complete
    Hugging Face LLaMA folder (model.init_from) whose vocabulary matches the tokenizer's."""
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
                          f"({type(e).__name__}); pass a Hugging Face LLaMA model folder") from None
    if raw.get("model_type", "llama") != "llama":
        raise ConfigError(f"model.init_from '{folder}' is a '{raw.get('model_type')}' model; pass a LLaMA "
                          f"(model_type llama) Hugging Face folder")
    if model_vocab != vocab_size:
        tok_dir = cfg.data.tokenizer_dir or "the bundled assets/tokenizer"
        raise ConfigError(
            f"model.init_from '{folder}' has vocab_size {model_vocab} but data.tokenizer_dir ({tok_dir}) has "
            f"{vocab_size}; set data.tokenizer_dir to the tokenizer the model was trained with (an exported "
            f"folder holds it: data.tokenizer_dir={folder})")
    try:
        return LlamaConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises various errors for bad configs
        raise ConfigError(f"model.init_from '{folder}': config.json does not load as a LlamaConfig "
                          f"({' '.join(str(e).split())[:120]}); pass a Hugging Face LLaMA model folder") from None


def build_model(config: LlamaConfig, seed: int, init_from: str = "") -> LlamaForCausalLM:
    """Random init from `seed` (identical on every rank), or weights from a HF folder, in fp32."""
    if init_from:
        model = LlamaForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) as in the PaLM appendix B / nanoGPT:
    6 * non-embedding matmul params + 6 * lm_head + 12 * layers * hidden * seq_len (attention).
    MFU uses this "model FLOPs" count in both phases so the figures stay comparable."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 4 * h * h + 3 * h * i
    return 6.0 * (L * per_layer + h * config.vocab_size) + 12.0 * L * h * seq_len
