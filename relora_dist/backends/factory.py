"""Pick the engine named by parallel.backend (ds_config.resolve_backend)."""

from __future__ import annotations

from relora_dist.backends.base import Backend


def make_backend(name: str, ds_config: dict, rank: int, world_size: int, optimizer_name: str = "adamw") -> Backend:
    if name == "fsdp2":
        from relora_dist.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(ds_config, rank, world_size, optimizer_name)
    if name == "zero3":
        from relora_dist.backends.zero3 import Zero3Backend

        return Zero3Backend(ds_config, rank, world_size, optimizer_name)
    from relora_dist.backends.zero2 import Zero2Backend

    return Zero2Backend(ds_config, rank, world_size, optimizer_name)
