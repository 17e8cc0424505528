"""The project's own sharded checkpoint format (DeepSpeed's refuses another world size, and its
universal checkpoint silently drops frozen weights in the ReLoRA phase; both checked on
DeepSpeed 0.19.8).

    <root>/step_00000120/
        manifest.json          global state, every tensor's shape/dtype and which rank holds which
                               flat range of which field, a sha256 per file and one of itself
        rank00000.safetensors  this rank's fragments only (nothing is gathered to one rank); the
                               same state gives the same bytes
        config.yaml            the run's config
        tokenizer/             the tokenizer's own files, TOKENIZER_FILES only (the checkpoint
                               converts on its own)
    <root>/latest              name of the newest complete checkpoint, written last

Readers open only what checkpoint/integrity.py allows: the writer's own shard names as regular files inside
the folder, `latest` naming a sibling step_* folder, a manifest whose own sha256 verifies.

Fields per parameter: `master` (fp32 master of a trainable param), `exp_avg`, `exp_avg_sq`
(Adam moments), `weight` (module copy of a param no optimizer holds), `merge_master` (fp32 merge
target of a frozen wrapped weight), `w_switch` (W at the switch, for the effective-rank diagnostic).
Every fragment is a contiguous range of the row-major flattened tensor, so any world size and ZeRO
stage can reassemble it. Loading reads safetensors and JSON only: nothing is unpickled.

What is written comes from the components of checkpoint/state.py: save_checkpoint takes a state.CheckpointState
and resume.load_checkpoint restores the same set.
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

from relora_dist.checkpoint import integrity
# OLDER, CheckpointError, check_tokenizer and shard_path are used here and by the readers that import them from here
from relora_dist.checkpoint.integrity import OLDER, CheckpointError, check_tokenizer, shard_path  # noqa: F401
from relora_dist.checkpoint.integrity import fsync_path as _fsync_dir
from relora_dist.checkpoint.state import CheckpointState
from relora_dist.data.tokenizer import tokenizer_files

# 2: the manifest carries its own sha256 (integrity.CHECKSUM); format 1 checkpoints still load.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LATEST = "latest"



def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()



def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --- saving ----------------------------------------------------------------------------------------
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
    newest = find_latest(root, strict=False)
    return CheckpointError(f"saving the checkpoint of step {step} failed on rank {rank} ({error}); nothing was "
                           f"published, the newest checkpoint is still {newest or 'none'}; free space or fix "
                           f"{root}, then rerun the same command to resume")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def save_checkpoint(state: CheckpointState, root: str | Path, keep_last: int) -> Path:
    """Write this step's checkpoint collectively; publish it atomically; keep the last K. A rank
    that cannot write (disk full, permissions) or holds a non-finite value fails the save on every
    rank at the same point; nothing is published and no older checkpoint is deleted."""
    from relora_dist.runtime.faults import RunAborted, progress

    root = Path(root)
    step = state.progress.step
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    error = None
    if state.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _describe(e)
    failure = _failed(_agreed(error), step, root)
    if failure:
        raise failure
    tensors, index = state.model.fragments()
    tensors.update(state.rng.state_dict())
    finite = all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    file = integrity.shard_name(state.rank)
    entry = {"rank": state.rank, "file": file, "index": index, "finite": finite, "error": None}
    try:
        if finite:
            # One metadata key: safetensors serializes the metadata map in hash order, so two keys
            # made identical saves differ in their bytes (and sha256).
            save_file(tensors, str(tmp / file), metadata={"relora_dist": json.dumps(
                {"format_version": FORMAT_VERSION, "rank": state.rank}, sort_keys=True)})
            with open(tmp / file, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / file, 0o644)  # safetensors creates it 0600; a checkpoint is for others to read
            entry["sha256"] = _sha256(tmp / file)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error wrapping one
        entry["error"] = _describe(e)
    del tensors
    progress()  # a long save is progress: the SIGTERM grace period restarts after each stage
    entries: list = [None] * state.world_size
    dist.all_gather_object(entries, entry)
    progress()
    failure = _failed([e["error"] for e in entries], step, root)
    nonfinite = [e["rank"] for e in entries if not e["finite"]]
    if (failure or nonfinite) and state.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure:
        raise failure
    if nonfinite:
        raise RunAborted(f"step {step}: the model holds non-finite values (rank {nonfinite[0]}); not saved, the "
                         f"newest checkpoint is still {find_latest(root, strict=False) or 'none'}; "
                         f"lower optimizer.lr / relora.lr")
    error = None
    if state.is_main:
        try:
            _publish(state, tmp, final, root, entries, keep_last)
        except Exception as e:  # noqa: BLE001 - OSError from any of the writes
            shutil.rmtree(tmp, ignore_errors=True)
            error = _describe(e)
    failure = _failed(_agreed(error), step, root)
    if failure:
        raise failure
    return final


def manifest_of(state: CheckpointState, entries: list[dict]) -> dict:
    """The manifest: every component's state_dict, every tensor's shape and which rank holds which
    flat range of it (from each rank's `entries`), and a sha256 per file."""
    tensors_meta = state.model.tensor_meta()
    for e in entries:
        for name, fields in e["index"].items():
            for field, (start, end) in fields.items():
                tensors_meta[name].setdefault("fields", {}).setdefault(field, []).append([e["rank"], start, end])
    progress, relora = state.progress.state_dict(), state.relora.state_dict()
    return {
        "format_version": FORMAT_VERSION, "global_step": progress["global_step"], "phase": progress["phase"],
        "restart_index": progress["restart_index"], "cumulative_rank": relora["cumulative_rank"],
        "relora": relora["relora"], "tokens_seen": progress["tokens_seen"],
        "skipped_steps": progress["skipped_steps"], "data_loader": state.loader.state_dict(),
        "lr_schedule": progress["lr_schedule"], "adam_step": state.model.adam_step(),
        "world_size": state.world_size, **state.model.backend.describe(), "precision": state.precision,
        "model_config": state.model_config.to_dict(), "adapters_active": relora["adapters_active"],
        "rank_stats": relora["rank_stats"], "tensors": tensors_meta,
        "files": [{"rank": e["rank"], "file": e["file"], "sha256": e["sha256"]} for e in entries],
        **_run_record(state),
    }


def _run_record(state: CheckpointState) -> dict:
    """What retention and a resume read besides the tensors: the eval loss measured at this step
    (None if none was), the non-finite skip streak, the fingerprints of the data and tokenizer."""
    from relora_dist.runtime.run_guard import run_fingerprints

    evals = state.progress.evals
    at_step = evals[-1]["eval_loss"] if evals and evals[-1]["step"] == state.progress.step else None
    return {"eval_loss": at_step, "skipped_in_a_row": state.progress.skipped_in_a_row,
            "fingerprints": run_fingerprints(state.cfg, state.tokenizer_dir)}


def _publish(state: CheckpointState, tmp: Path, final: Path, root: Path, entries: list[dict], keep_last: int) -> None:
    """Rank 0: manifest, config and tokenizer into `tmp`, fsync, rename, point `latest`, retention."""
    from relora_dist.config import dump_config

    manifest = manifest_of(state, entries)
    dump_config(state.cfg, tmp / "config.yaml")
    # Only the tokenizer's own files, as regular files: a tokenizer_dir that is a whole model
    # folder must not carry its weights, config or code into the checkpoint (and on into exports).
    (tmp / "tokenizer").mkdir()
    for name in tokenizer_files(state.tokenizer_dir):
        shutil.copyfile(Path(state.tokenizer_dir) / name, tmp / "tokenizer" / name)
    _write_synced(tmp / MANIFEST, json.dumps(integrity.with_checksum(manifest), indent=1))
    _fsync_tree(tmp)
    _fsync_dir(tmp)
    if final.exists():  # another run's (a resume moves its own abandoned ones aside first): never replaced
        raise CheckpointError(f"{final} already exists and was not written by this run; nothing was replaced; "
                              f"use another --run.output_dir")
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    _write_synced(latest_tmp, final.name)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    # Every published checkpoint is finite (a non-finite model is never saved); run_guard.to_keep
    # also keeps the best-eval one and the newest saved outside a skip streak.
    if keep_last > 0:
        from relora_dist.runtime.run_guard import remove_checkpoint, to_keep

        found = list_checkpoints(root)
        keep = to_keep(found, keep_last, final)
        for old in found:
            if old not in keep:
                remove_checkpoint(old)


def remove_stale_temporaries(root: str | Path) -> list[str]:
    """Remove what a save killed midway left (`.tmp-step_*` folders, `.latest.tmp`); run at start-up
    on rank 0, when nothing else writes here. Returns the names removed."""
    root = Path(root)
    stale = sorted(root.glob(".tmp-step_*")) + sorted(root.glob(".del-step_*")) + sorted(root.glob(f".{LATEST}.tmp")) \
        if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return [p.name for p in stale]


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith("step_") and p.name[5:].isdigit() and not p.is_symlink() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))  # by step: names past 8 digits do not sort


def find_latest(root: str | Path, strict: bool = True) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one. `latest` may name only a
    sibling step_* folder (not a path into another run); strict=False (error messages) ignores a
    pointer that does not, instead of raising CheckpointError."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        problem = integrity.latest_problem(name)
        if problem and strict:
            raise CheckpointError(f"{pointer} {problem}: it may name only a checkpoint of this folder; "
                                  f"pass --checkpoint.resume={root}/step_N (or repair {pointer})")
        candidate = root / name
        if not problem and not candidate.is_symlink() and (candidate / MANIFEST).is_file():
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
    if isinstance(version, int) and isinstance(manifest, dict):
        problem = integrity.checksum_problem(manifest, version) or problem
    if problem:
        raise CheckpointError(f"{path} {problem}: not a relora_dist checkpoint manifest, or a damaged one; {older}")
    return manifest


class ShardReader:
    """Reassembles full tensors from every rank's file; verifies checksums. No process group."""

    def __init__(self, ckpt_dir: str | Path, verify: bool = True):
        self.dir = Path(ckpt_dir)
        self.manifest = read_manifest(self.dir)
        ranks = sorted(f["rank"] for f in self.manifest["files"] if isinstance(f["rank"], int))
        if ranks != list(range(self.manifest["world_size"])):
            raise self._disagrees(f"lists shards of ranks {ranks} for world_size {self.manifest['world_size']}")
        self.handles = {}
        for f in self.manifest["files"]:
            path = shard_path(self.dir, f)
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
            handle, key = self.handles.get(rank), f"{name}/{field}"
            if handle is None or key not in handle.keys():
                raise self._disagrees(f"places '{key}' on rank {rank}, whose shard "
                                      f"{'does not exist' if handle is None else 'lacks it'}")
            piece = handle.get_tensor(key)
            if piece.numel() != end - start:
                raise self._disagrees(f"gives '{key}' elements {start}..{end} on rank {rank}, the shard holds "
                                      f"{piece.numel()}")
            pieces.append(piece.reshape(-1))
            pos = end
        if pos != shape.numel():
            raise CheckpointError(f"{self.dir}: field '{field}' of '{name}' covers {pos} of {shape.numel()} "
                                  f"elements; the checkpoint is incomplete, {OLDER.format(root=self.dir.parent)}")
        return torch.cat(pieces).view(shape)

    def _disagrees(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.dir / MANIFEST} {what}: the manifest disagrees with the shards; the "
                               f"checkpoint is damaged, {OLDER.format(root=self.dir.parent)}")

    def rng_state(self, rank: int, key: str = "rng/cpu") -> torch.Tensor | None:
        handle = self.handles.get(rank, self.handles[0])
        return handle.get_tensor(key) if key in handle.keys() else None

    def rank_tensors(self, rank: int, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors named `prefix`... in `rank`'s own file (none when the checkpoint has no such
        rank), keyed without the prefix."""
        handle = self.handles.get(rank)
        if handle is None:
            return {}
        return {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}


def consolidated_state_dict(reader: ShardReader, merge_adapters: bool = True) -> dict[str, torch.Tensor]:
    """fp32 HF-named weights of a checkpoint: fp32 masters where they exist, live adapters merged
    by export.merged_state_dict (the same merge as the live export's)."""
    from relora_dist.checkpoint.export import merged_state_dict

    return merged_state_dict(_saved_weights(reader), _saved_adapters(reader) if merge_adapters else ())


def _saved_weights(reader: ShardReader):
    for name in reader.manifest["tensors"]:
        if ".lora_" in name:
            continue
        for field in ("master", "merge_master", "weight"):
            if reader.has(name, field):
                yield name, reader.full(name, field).float()
                break


def _saved_adapters(reader: ShardReader):
    m = reader.manifest
    if not m["adapters_active"]:
        return
    r, alpha = m["relora"]["r"], m["relora"]["alpha"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
        raise reader._disagrees(f"has relora r={r!r} alpha={alpha!r} with live adapters (r must be a positive "
                                f"integer)")
    scale = alpha / r
    for module in m["relora"]["wrapped_modules"]:
        yield module, _first(reader, f"{module}.lora_A"), _first(reader, f"{module}.lora_B"), scale


def _first(reader: ShardReader, name: str) -> torch.Tensor:
    field = "master" if reader.has(name, "master") else "weight"
    return reader.full(name, field).float()
