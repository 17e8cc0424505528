"""The engine contract: outside relora_dist/backends/ nothing names a DeepSpeed internal, so a
second engine needs no edits to the trainer, the ReLoRA steps, checkpoints, export or the tests'
scenarios. A grep, because the failure it prevents is a name, not a behaviour."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Attributes DeepSpeed hangs on params and optimizers, its full-tensor helpers, and the ZeRO stage.
INTERNALS = re.compile(r"\b(ds_numel|ds_shape|ds_tensor|ds_id|ds_status|bit16_groups|fp16_groups|"
                       r"single_partition_of_fp32_groups|fp32_partitioned_groups_flat|safe_get_full_\w+|"
                       r"safe_set_\w+|GatheredParameters|zero\.Init|"
                       # ... and FSDP2's: its wrappers, DTensor shards and mesh
                       r"fully_shard|FSDPModule|MixedPrecisionPolicy|init_device_mesh|DTensor|to_local|full_tensor|"
                       r"_local_tensor|set_force_sum_reduction_for_comms)\b|optimizer\.optimizer\b|backend\.stage\b")
# Only the backends (the DeepSpeed JSON builder, backends/ds_config.py, among them). The benchmark
# harness lists an engine's tensors through Probe.held_tensors, so it needs no entry.
ALLOWED = ("relora_dist/backends/", "tests/test_engine_contract.py")


def test_no_deepspeed_internals_outside_backends():
    hits = []
    for path in sorted(REPO.glob("**/*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(ALLOWED) or not rel.startswith(("relora_dist/", "tests/", "tools/", "launchers/")):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if INTERNALS.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, ("engine internals outside relora_dist/backends/ (add a member to a face: Shards, "
                      "OptimizerState or Probe):\n" + "\n".join(hits))


def test_the_grep_finds_what_it_forbids():
    for line in ("n = p.ds_numel", "opt = engine.optimizer.optimizer", "if trainer.backend.stage == 3:",
                 "from deepspeed.utils import safe_get_full_grad", "with deepspeed.zero.GatheredParameters([w]):",
                 "shard = p.to_local()", "from torch.distributed.fsdp import fully_shard", "isinstance(p, DTensor)"):
        assert INTERNALS.search(line), line
    for line in ("backend.shards.numel(p)", "backend.name", "self.optimizer_name", "zero_stage(template)"):
        assert not INTERNALS.search(line), line


# The Probe (backends/probe.py) is for the benchmark and the tests: a training must not depend on it.
PROBE = re.compile(r"\b(probe|Probe)\b")
NO_PROBE = ("relora_dist/trainer.py", "relora_dist/relora/steps.py")


def test_trainer_and_steps_do_not_use_the_probe():
    hits = [f"{rel}:{i}: {line.strip()}" for rel in NO_PROBE
            for i, line in enumerate((REPO / rel).read_text().splitlines(), 1) if PROBE.search(line)]
    assert not hits, "the Probe is for bench and tests only:\n" + "\n".join(hits)
    assert PROBE.search("from relora_dist.backends.probe import probe")
    assert PROBE.search("for t in probe(backend).held_tensors(engine, model):")


def test_backend_contract_stays_small():
    """Lifecycle and the training step; shard and optimizer-state members live on their faces."""
    from relora_dist.backends.base import Backend

    members = {n for c in Backend.__mro__[:-1] for n in [*vars(c), *getattr(c, "__annotations__", {})]
               if not n.startswith("__") and n != "_abc_impl"}
    assert len(members) <= 12, sorted(members)
