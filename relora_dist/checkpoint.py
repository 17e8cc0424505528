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


OLDER = ("resume an older one with --checkpoint.resume=previous (the newest that verifies) or "
         "--checkpoint.resume={root}/step_N")


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
    for module, m in trainer.modules.items():
        # A quantized base is no Parameter: its fp32 master is what is saved (never the quantized
        # bytes), so a resume requantizes exactly and any world size / quantization setting can load it.
        if m.qweight is not None:
            start, _ = backend.master_range(m.weight)
            put(f"{module}.weight", "merge_master", start, masters.shards[module])
            if masters.at_switch:
                put(f"{module}.weight", "w_switch", start, masters.at_switch[module])
    rng = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng/cuda"] = torch.cuda.get_rng_state()
    tensors.update(rng)
    return tensors, index


def _tensor_meta(trainer) -> dict[str, dict]:
    backend = trainer.backend
    meta = {name: {"shape": list(backend.shape(p)), "dtype": str(backend.storage_dtype(p)).replace("torch.", ""),
                   "trainable": bool(p.requires_grad)}
            for name, p in trainer.model.named_parameters()}
    for module, m in trainer.modules.items():
        if m.qweight is not None:  # stored as its fp32 master
            meta[f"{module}.weight"] = {"shape": [m.out_features, m.in_features], "dtype": "float32",
                                        "trainable": False, "base_quant": m.qweight.kind}
    return meta


def _write_synced(path: Path, text: str) -> None:
    """Write and fsync a small file (a rename publishes it only after its bytes are on disk)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _agreed(error: str | None) -> list[str | None]:
    """Every rank's error (None = fine), on every rank: a failure on one rank stops all of them at
    the same point instead of leaving the others in the next collective."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def _failed(errors: list[str | None], step: int, root: Path) -> CheckpointError | None:
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if not bad:
        return None
    rank, error = bad[0]
    newest = find_latest(root)
    return CheckpointError(f"saving the checkpoint of step {step} failed on rank {rank} ({error}); nothing was "
                           f"published, the newest checkpoint is still {newest or 'none'}; free space or fix "
                           f"{root}, then rerun the same command to resume")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def save_checkpoint(trainer, root: str | Path, keep_last: int) -> Path:
    """Write this step's checkpoint collectively; publish it atomically; keep the last K. A rank
    that cannot write (disk full, permissions) or holds a non-finite value fails the save on every
    rank at the same point; nothing is published and no older checkpoint is deleted."""
    from relora_dist.faults import RunAborted, progress

    root = Path(root)
    st, info = trainer.state, trainer.info
    final = root / step_dir_name(st.step)
    tmp = root / f".tmp-{step_dir_name(st.step)}"
    error = None
    if info.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _describe(e)
    failure = _failed(_agreed(error), st.step, root)
    if failure:
        raise failure
    tensors, index = _rank_fragments(trainer)
    finite = all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    file = f"rank{info.rank:05d}.safetensors"
    entry = {"rank": info.rank, "file": file, "index": index, "finite": finite, "error": None}
    try:
        if finite:
            save_file(tensors, str(tmp / file),
                      metadata={"format_version": str(FORMAT_VERSION), "rank": str(info.rank)})
            with open(tmp / file, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / file, 0o644)  # safetensors creates it 0600; a checkpoint is for others to read
            entry["sha256"] = _sha256(tmp / file)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error wrapping one
        entry["error"] = _describe(e)
    del tensors
    progress()  # a long save is progress: the SIGTERM grace period restarts after each stage
    entries: list = [None] * info.world_size
    dist.all_gather_object(entries, entry)
    progress()
    failure = _failed([e["error"] for e in entries], st.step, root)
    nonfinite = [e["rank"] for e in entries if not e["finite"]]
    if (failure or nonfinite) and info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure:
        raise failure
    if nonfinite:
        raise RunAborted(f"step {st.step}: the model holds non-finite values (rank {nonfinite[0]}); not saved, the "
                         f"newest checkpoint is still {find_latest(root) or 'none'}; lower optimizer.lr / relora.lr")
    stats = trainer.rank_stats(measure=False)
    error = None
    if info.is_main:
        try:
            _publish(trainer, tmp, final, root, entries, stats, keep_last)
        except Exception as e:  # noqa: BLE001 - OSError from any of the writes
            shutil.rmtree(tmp, ignore_errors=True)
            error = _describe(e)
    failure = _failed(_agreed(error), st.step, root)
    if failure:
        raise failure
    return final


def _publish(trainer, tmp: Path, final: Path, root: Path, entries: list[dict], stats: dict, keep_last: int) -> None:
    """Rank 0: manifest, config and tokenizer into `tmp`, fsync, rename, point `latest`, retention."""
    from relora_dist.config import dump_config
    from relora_dist.relora import cumulative_rank

    st, c = trainer.state, trainer.cfg
    tensors_meta = _tensor_meta(trainer)
    for e in entries:
        for name, fields in e["index"].items():
            for field, (start, end) in fields.items():
                tensors_meta[name].setdefault("fields", {}).setdefault(field, []).append([e["rank"], start, end])
    cum = {n: cumulative_rank(m.r, st.restart_index, m.out_features, m.in_features)
           for n, m in trainer.modules.items()} if st.phase == "relora" else {}
    manifest = {
        "format_version": FORMAT_VERSION, "global_step": st.step, "phase": st.phase,
        "restart_index": st.restart_index, "cumulative_rank": {"per_module": cum, "total": sum(cum.values())},
        "relora": {"r": c.relora.r, "alpha": c.relora.alpha, "targets": c.relora.targets,
                   "wrapped_modules": sorted(trainer.modules)},
        "tokens_seen": st.tokens_seen, "skipped_steps": st.skipped_steps, "data_loader": trainer.loader.state_dict(),
        "lr_schedule": {"step": st.step, "last_lr": st.history[-1]["lr"] if st.history else 0.0},
        "adam_step": trainer.backend.adam_step(trainer.engine) if trainer.engine is not None else None,
        "world_size": trainer.info.world_size, **trainer.backend.describe(), "precision": trainer.precision,
        "model_config": trainer.model_config.to_dict(), "adapters_active": st.phase == "relora",
        "rank_stats": stats, "tensors": tensors_meta,
        "files": [{"rank": e["rank"], "file": e["file"], "sha256": e["sha256"]} for e in entries],
    }
    dump_config(c, tmp / "config.yaml")
    shutil.copytree(trainer.tokenizer_dir, tmp / "tokenizer")
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
    _fsync_tree(tmp)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    _write_synced(latest_tmp, final.name)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    # Every published checkpoint is finite (a non-finite model is never saved), so keeping the
    # newest K always keeps the newest finite one.
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(root: str | Path) -> list[str]:
    """Remove what a save killed midway left (`.tmp-step_*` folders, `.latest.tmp`); run at start-up
    on rank 0, when nothing else writes here. Returns the names removed."""
    root = Path(root)
    stale = sorted(p for p in root.glob(".tmp-step_*")) + sorted(root.glob(f".{LATEST}.tmp")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return [p.name for p in stale]


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
# What a manifest must hold for any reader (trainer, convert, inspect) to use it.
_REQUIRED = {"global_step": int, "phase": str, "restart_index": int, "tokens_seen": int, "world_size": int,
             "zero_stage": int, "adapters_active": bool, "relora": dict, "model_config": dict,
             "data_loader": dict, "tensors": dict, "files": list}


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not a manifest object"
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        return f"lacks {', '.join(missing)}"
    wrong = [k for k, t in _REQUIRED.items() if not isinstance(manifest[k], t)]
    if wrong:
        return f"has {', '.join(wrong)} of the wrong type"
    if not all(isinstance(f, dict) and {"rank", "file", "sha256"} <= f.keys() for f in manifest["files"]):
        return "has a files entry without rank, file and sha256"
    if not all(isinstance(t, dict) and isinstance(t.get("shape"), list) for t in manifest["tensors"].values()):
        return "has a tensors entry without a shape"
    if not {"r", "alpha", "wrapped_modules"} <= manifest["relora"].keys():
        return "has a relora entry without r, alpha and wrapped_modules"
    return None


def read_manifest(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass a checkpoint directory (step_*/) or --checkpoint.resume=auto")
    older = OLDER.format(root=path.parent.parent)
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({getattr(e, 'msg', type(e).__name__)}): the checkpoint "
                              f"is corrupt; {older}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}, newer than this relora_dist reads "
                              f"({FORMAT_VERSION}); upgrade relora_dist")
    problem = _manifest_problem(manifest) if isinstance(version, int) or not isinstance(manifest, dict) else \
        "has no integer format_version"
    if problem:
        raise CheckpointError(f"{path} {problem}: not a relora_dist checkpoint manifest, or a damaged one; {older}")
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
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; {OLDER.format(root=self.dir.parent)}")
            if verify and _sha256(path) != f["sha256"]:
                raise CheckpointError(f"{path} fails its sha256 check (truncated or corrupted); "
                                      f"{OLDER.format(root=self.dir.parent)}")
            try:
                self.handles[f["rank"]] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path} is not a readable safetensors file ({_describe(e)}); "
                                      f"{OLDER.format(root=self.dir.parent)}")

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
                                  f"elements; the checkpoint is incomplete, {OLDER.format(root=self.dir.parent)}")
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
