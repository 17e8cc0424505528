"""The project's own sharded checkpoint format (DeepSpeed's refuses another world size, and its
universal checkpoint silently drops frozen weights in the ReLoRA phase; both checked on
DeepSpeed 0.19.8).

    <root>/step_00000120/
        manifest.json          global state, every tensor's shape/dtype and which rank holds which
                               flat range of which field, a sha256 per file
        rank00000.safetensors  this rank's fragments only (nothing is gathered to one rank)
        config.yaml            the run's config
        tokenizer/             the tokenizer files (the checkpoint converts on its own)
    <root>/latest              name of the newest complete checkpoint, written last

Fields per parameter: `master` (fp32 master of a trainable param), `exp_avg`, `exp_avg_sq`
(Adam moments), `weight` (module copy of a param no optimizer holds), `merge_master` (fp32 merge
target of a frozen wrapped weight), `w_switch` (W at the switch, for the effective-rank diagnostic).
Every fragment is a contiguous range of the row-major flattened tensor, so any world size and ZeRO
stage can reassemble it. Loading reads safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A one-line problem with a checkpoint that names the file and the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --- saving ----------------------------------------------------------------------------------------
def _rank_fragments(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's tensors for the safetensors file and the index of what they are."""
    backend, engine, masters = trainer.backend, trainer.engine, trainer.masters
    if engine is not None:
        backend.link_optimizer_fragments(engine)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}

    def put(name: str, field: str, start: int, frag: torch.Tensor | None) -> None:
        if frag is None or frag.numel() == 0:
            return
        tensors[f"{name}/{field}"] = frag.detach().reshape(-1).contiguous().cpu().clone()
        index.setdefault(name, {})[field] = [start, start + frag.numel()]

    module_of = {f"{n}.weight": n for n in trainer.modules}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad and engine is not None:
            start, _, frag = backend.fp32_fragment(p)
            put(name, "master", start, frag)
            for key in ADAM_KEYS:
                put(name, key, start, backend.state_fragment(p, key))
        else:
            start, end = backend.save_range(p)
            lstart, _ = backend.local_range(p)
            put(name, "weight", start, backend.local_view(p)[start - lstart:end - lstart])
        module = module_of.get(name)
        if module is not None and masters is not None:
            start, _ = backend.master_range(p)  # masters and W_switch hold exactly this range
            if masters.kept:
                put(name, "merge_master", start, masters.shards[module])
            if masters.at_switch:
                put(name, "w_switch", start, masters.at_switch[module])
    rng = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng/cuda"] = torch.cuda.get_rng_state()
    tensors.update(rng)
    return tensors, index


def _tensor_meta(trainer) -> dict[str, dict]:
    return {name: {"shape": list(getattr(p, "ds_shape", p.shape)),
                   "dtype": str(getattr(p, "ds_tensor", p).dtype).replace("torch.", ""),
                   "trainable": bool(p.requires_grad)}
            for name, p in trainer.model.named_parameters()}


def save_checkpoint(trainer, root: str | Path, keep_last: int) -> Path:
    """Write this step's checkpoint collectively; publish it atomically; keep the last K."""
    from relora_dist.config import dump_config

    root = Path(root)
    st, info = trainer.state, trainer.info
    final = root / step_dir_name(st.step)
    tmp = root / f".tmp-{step_dir_name(st.step)}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors, index = _rank_fragments(trainer)
    file = f"rank{info.rank:05d}.safetensors"
    save_file(tensors, str(tmp / file), metadata={"format_version": str(FORMAT_VERSION), "rank": str(info.rank)})
    with open(tmp / file, "rb") as f:
        os.fsync(f.fileno())
    entry = {"rank": info.rank, "file": file, "sha256": _sha256(tmp / file), "index": index}
    entries: list = [None] * info.world_size
    dist.all_gather_object(entries, entry)
    stats = trainer.rank_stats(measure=False)
    if info.is_main:
        tensors_meta = _tensor_meta(trainer)
        for e in entries:
            for name, fields in e["index"].items():
                for field, (start, end) in fields.items():
                    tensors_meta[name].setdefault("fields", {}).setdefault(field, []).append([e["rank"], start, end])
        c = trainer.cfg
        cum = {n: min(m.r * (st.restart_index + 1), m.out_features, m.in_features)
               for n, m in trainer.modules.items()} if st.phase == "relora" else {}
        manifest = {
            "format_version": FORMAT_VERSION, "global_step": st.step, "phase": st.phase,
            "restart_index": st.restart_index, "cumulative_rank": {"per_module": cum, "total": sum(cum.values())},
            "relora": {"r": c.relora.r, "alpha": c.relora.alpha, "targets": c.relora.targets,
                       "wrapped_modules": sorted(trainer.modules)},
            "tokens_seen": st.tokens_seen, "data_loader": trainer.loader.state_dict(),
            "lr_schedule": {"step": st.step, "last_lr": st.history[-1]["lr"] if st.history else 0.0},
            "adam_step": trainer.backend.adam_step(trainer.engine) if trainer.engine is not None else None,
            "world_size": info.world_size, "zero_stage": trainer.backend.stage, "precision": trainer.precision,
            "model_config": trainer.model_config.to_dict(), "adapters_active": st.phase == "relora",
            "rank_stats": stats, "tensors": tensors_meta,
            "files": [{"rank": e["rank"], "file": e["file"], "sha256": e["sha256"]} for e in entries],
        }
        dump_config(c, tmp / "config.yaml")
        shutil.copytree(trainer.tokenizer_dir, tmp / "tokenizer")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / LATEST)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / MANIFEST).is_file())


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / MANIFEST).is_file():
            return candidate
    found = list_checkpoints(root)
    return found[-1] if found else None


# --- reading ---------------------------------------------------------------------------------------
def read_manifest(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass a checkpoint directory (step_*/) or --checkpoint.resume=auto")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}): the checkpoint is corrupt; use an older one")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}, newer than this relora_dist reads "
                              f"({FORMAT_VERSION}); upgrade relora_dist")
    return manifest


class ShardReader:
    """Reassembles full tensors from every rank's file; verifies checksums. No process group."""

    def __init__(self, ckpt_dir: str | Path, verify: bool = True):
        self.dir = Path(ckpt_dir)
        self.manifest = read_manifest(self.dir)
        self.handles = {}
        for f in self.manifest["files"]:
            path = self.dir / f["file"]
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; use an older one")
            if verify and _sha256(path) != f["sha256"]:
                raise CheckpointError(f"{path} fails its sha256 check (truncated or corrupted); use an older checkpoint")
            try:
                self.handles[f["rank"]] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}); use an older checkpoint")

    def has(self, name: str, field: str) -> bool:
        return field in self.manifest["tensors"].get(name, {}).get("fields", {})

    def full(self, name: str, field: str) -> torch.Tensor:
        meta = self.manifest["tensors"].get(name)
        if meta is None:
            raise CheckpointError(f"{self.dir / MANIFEST} has no tensor '{name}': the checkpoint is from another "
                                  f"model; start a new output_dir or resume the matching run")
        shape = torch.Size(meta["shape"])
        parts = sorted(meta.get("fields", {}).get(field, []), key=lambda x: x[1])
        pieces, pos = [], 0
        for rank, start, end in parts:
            if start != pos:
                break
            pieces.append(self.handles[rank].get_tensor(f"{name}/{field}"))
            pos = end
        if pos != shape.numel():
            raise CheckpointError(f"{self.dir}: field '{field}' of '{name}' covers {pos} of {shape.numel()} "
                                  f"elements; the checkpoint is incomplete, use an older one")
        return torch.cat(pieces).view(shape)

    def rng_state(self, rank: int, key: str = "rng/cpu") -> torch.Tensor | None:
        handle = self.handles.get(rank, self.handles[0])
        return handle.get_tensor(key) if key in handle.keys() else None


def consolidated_state_dict(reader: ShardReader, merge_adapters: bool = True) -> dict[str, torch.Tensor]:
    """fp32 HF-named weights: fp32 masters where they exist, live adapters merged (W + s*B*A)."""
    from relora_dist.relora import lora_delta

    m = reader.manifest
    sd = {}
    for name, meta in m["tensors"].items():
        if ".lora_" in name:
            continue
        for field in ("master", "merge_master", "weight"):
            if reader.has(name, field):
                sd[name] = reader.full(name, field).float()
                break
    if merge_adapters and m["adapters_active"]:
        scale = m["relora"]["alpha"] / m["relora"]["r"]
        for module in m["relora"]["wrapped_modules"]:
            A = _first(reader, f"{module}.lora_A")
            B = _first(reader, f"{module}.lora_B")
            sd[f"{module}.weight"] = sd[f"{module}.weight"] + lora_delta(A, B, scale)
    return sd


def _first(reader: ShardReader, name: str) -> torch.Tensor:
    field = "master" if reader.has(name, "master") else "weight"
    return reader.full(name, field).float()


# --- resuming --------------------------------------------------------------------------------------
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_compatible(manifest: dict, trainer, ckpt_dir: Path) -> None:
    """Refuse a checkpoint of another model or adapter layout (before anything is written)."""
    ours = trainer.model_config.to_dict()
    for key in MODEL_KEYS:
        if manifest["model_config"].get(key) != ours.get(key):
            raise CheckpointError(
                f"{ckpt_dir / MANIFEST}: model {key}={manifest['model_config'].get(key)} but this run has "
                f"{ours.get(key)}; resume with the checkpoint's config ({ckpt_dir / 'config.yaml'}) or use a new output_dir")
    if manifest["phase"] == "relora":
        theirs = manifest["relora"]
        if theirs["r"] != trainer.cfg.relora.r or theirs["wrapped_modules"] != sorted(trainer.modules):
            raise CheckpointError(
                f"{ckpt_dir / MANIFEST}: adapters r={theirs['r']} over {len(theirs['wrapped_modules'])} modules but "
                f"this run has r={trainer.cfg.relora.r} over {len(trainer.modules)}; keep relora.r and relora.targets")


def load_checkpoint(trainer, ckpt_dir: str | Path) -> dict:
    """Restore params, fp32 masters, merge masters, Adam moments and step, data position, RNG and
    counters into a Trainer built for the checkpoint's phase, at any world size and ZeRO stage.
    Every rank reads the full tensors it needs from all files and keeps only its own shard."""
    ckpt_dir = Path(ckpt_dir)
    reader = ShardReader(ckpt_dir)
    m = reader.manifest
    check_compatible(m, trainer, ckpt_dir)
    backend, engine, masters = trainer.backend, trainer.engine, trainer.masters
    frozen_fields = ("merge_master", "weight", "master")
    for name, p in trainer.model.named_parameters():
        if p.requires_grad and engine is not None:
            field = "master" if reader.has(name, "master") else "merge_master" if reader.has(name, "merge_master") else "weight"
            backend.write_trainable(p, reader.full(name, field).float())
        else:
            field = next(f for f in frozen_fields if reader.has(name, f) or f == "master")
            backend.write_frozen(p, reader.full(name, field))
    if masters is not None:
        for module, mod in trainer.modules.items():
            name = f"{module}.weight"
            # Fields hold full tensors whatever layout wrote them (replicated or sharded masters, any
            # world size): each rank copies out its own slice, in place (keeps pinned host memory).
            if masters.kept:
                field = "merge_master" if reader.has(name, "merge_master") else "weight"
                masters.shards[module].copy_(backend.master_slice_of(mod.weight, reader.full(name, field).float()))
            if reader.has(name, "w_switch") and masters.at_switch:
                masters.at_switch[module] = backend.master_slice_of(
                    mod.weight, reader.full(name, "w_switch").float()).clone()
    if engine is not None and m.get("adam_step") is not None:
        backend.init_optimizer_state(engine, int(m["adam_step"]))
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                for key in ADAM_KEYS:
                    if reader.has(name, key):
                        backend.write_optimizer_state(p, key, reader.full(name, key))
    trainer.loader.load_state_dict(m["data_loader"])
    st = trainer.state
    st.step, st.tokens_seen, st.restart_index, st.phase = (
        m["global_step"], m["tokens_seen"], m["restart_index"], m["phase"])
    rng = reader.rng_state(trainer.info.rank)
    if rng is not None:
        torch.set_rng_state(rng)
    cuda_rng = reader.rng_state(trainer.info.rank, "rng/cuda")
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return m


# Settings that make a checkpoint another run's when they differ (train.max_steps may change: it
# extends or shortens the same run).
RUN_IDENTITY = {"model": None, "data": ("seq_len",), "train": ("global_batch_size", "seed"),
                "relora": ("enabled", "warm_start_steps", "r", "alpha", "targets", "cycle_length")}


def _identity_diff(ours: dict, theirs: dict) -> str | None:
    for section, keys in RUN_IDENTITY.items():
        for key in keys or ours.get(section, {}).keys():
            a, b = ours.get(section, {}).get(key), theirs.get(section, {}).get(key)
            if a != b:
                return f"{section}.{key} {b!r} there vs {a!r} here"
    return None


def check_output_dir(cfg, checkpoint_root: str | Path) -> None:
    """Refuse to train over another run's checkpoints: with checkpoint.resume='' any existing
    checkpoint, with 'auto' one whose run-defining settings differ (torchtitan-style auto-resume
    of the same run is what a preempted cluster job needs). checkpoint.overwrite lifts both."""
    import yaml

    from relora_dist.config import to_dict

    ck = cfg.checkpoint
    if ck.resume and ck.resume != "auto":
        if not (Path(ck.resume) / MANIFEST).is_file():
            raise CheckpointError(f"checkpoint.resume={ck.resume}: no {MANIFEST} there; pass a step_* directory or auto")
        return
    latest = find_latest(checkpoint_root)
    if latest is None or ck.overwrite:
        return
    if not ck.resume:
        raise CheckpointError(
            f"{checkpoint_root} already holds checkpoints ({latest.name}); pass --checkpoint.resume=auto to "
            f"continue that run, --checkpoint.overwrite=true to replace it, or another --run.output_dir")
    saved = latest / "config.yaml"
    theirs = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    diff = _identity_diff(to_dict(cfg), theirs or {})
    if diff:
        raise CheckpointError(
            f"{latest} belongs to another run ({diff}); use another --run.output_dir, or "
            f"--checkpoint.overwrite=true to replace it")


def remove_checkpoints(checkpoint_root: str | Path) -> None:
    """checkpoint.overwrite: a new run replaces the old checkpoints (rank 0 only)."""
    root = Path(checkpoint_root)
    for path in list_checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
    (root / LATEST).unlink(missing_ok=True)
