"""What only the benchmark (relora_dist/bench/) and the tests read of an engine: a face outside
the contract. The trainer and the ReLoRA steps may not use it (tests/test_engine_contract.py), so
nothing a training needs depends on it.

    from relora_dist.backends.probe import probe
    for name, tensor, category in probe(trainer.backend).held_tensors(trainer.engine, trainer.model): ...
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

import torch

HELD_CATEGORIES = ("params", "grads", "fp32_master", "optimizer_state", "comm_buffers", "gathered_params", "other")
"""What `Probe.held_tensors` sorts tensors into; the first four are the training state."""

_PROBES = {"zero2": "relora_dist.backends.zero:ZeroProbe", "zero3": "relora_dist.backends.zero3:Zero3Probe",
           "fsdp2": "relora_dist.backends.fsdp2:FSDP2Probe"}


def probe(backend) -> "Probe":
    """The Probe of `backend`'s engine."""
    module, _, cls = _PROBES[backend.name].partition(":")
    return getattr(importlib.import_module(module), cls)(backend)


class Probe:
    """Instrumentation of one backend's engines (tools/bench.py, tests)."""

    def __init__(self, backend):
        self.backend = backend
        self.shards = backend.shards

    def optimizer_params(self, engine: Any) -> list[torch.nn.Parameter]:
        """The module params the engine's optimizer updates (its view of the param groups)."""
        return self.backend.optimizer_state.params(engine)

    def inner_optimizer(self, engine: Any) -> torch.optim.Optimizer:
        """The torch optimizer that owns the state (its type and state tensors, for tests)."""
        return engine.optimizer

    def optimizer_state_numel(self, engine: Any) -> int:
        """Elements of optimizer master state this rank holds (per Adam key, i.e. the fp32 masters)."""
        raise NotImplementedError

    def held_tensors(self, engine: Any, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(name, tensor, category) of every tensor the engine and the module hold on this rank,
        category one of HELD_CATEGORIES. A storage may come under several names (a view, a param
        and its optimizer's reference); the caller counts each storage once. Engines expose
        `forward`, `backward` and `step` so that a caller can tag the collectives of each."""
        raise NotImplementedError(f"{self.backend.name} does not list its tensors")

    def collective_bindings(self) -> list[tuple[Any, str, str]]:
        """(owner, attribute, torch.distributed op it runs) of collectives the engine bound at
        start-up outside torch.distributed, so that wrapping torch.distributed misses them."""
        return []

    def gathered_params(self, params: list[torch.nn.Parameter]):
        """A context in which the module copies of `params` are whole, for a forward outside the
        engine (collective where they are sharded). FSDP2 has none: run forwards through the engine."""
        raise NotImplementedError(f"{self.backend.name}: run forwards through the engine (its params are shards)")

    def gathered_update(self, p: torch.nn.Parameter, fn: Callable[[torch.Tensor], None]) -> None:
        """Gather the whole module copy of p, let rank 0 modify it in place (`fn(full)`) and
        re-shard it from rank 0: the gather-based merge the shard-local one is compared with
        (tools/bench.py). Only ZeRO-3 has one."""
        raise NotImplementedError(f"{self.backend.name} has no gathered update")

    def gather_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The whole gradient of a trainable param after backward, before the step (collective)."""
        raise NotImplementedError
