"""Pick the engine named by parallel.backend (ds_config.resolve_backend)."""

from __future__ import annotations

from relora_dist.backends.base import Backend


def make_backend(name: str, settings: dict, rank: int, world_size: int, optimizer_name: str = "adamw",
                 implementation: str = "foreach") -> Backend:
    """`settings`: the resolved DeepSpeed JSON (backends/ds_config.py), which the ZeRO engines take
    whole; FSDP2 reads from it only what both kinds of engine share (clipping and precision).
    `implementation`: how torch AdamW steps (optimizer.implementation)."""
    if name == "fsdp2":
        from relora_dist.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(rank, world_size, optimizer_name, grad_clip=float(settings.get("gradient_clipping", 0.0)),
                            bf16=bool(settings.get("bf16", {}).get("enabled", False)), implementation=implementation)
    if name == "zero3":
        from relora_dist.backends.zero3 import Zero3Backend

        return Zero3Backend(settings, rank, world_size, optimizer_name, implementation)
    from relora_dist.backends.zero2 import Zero2Backend

    return Zero2Backend(settings, rank, world_size, optimizer_name, implementation)
