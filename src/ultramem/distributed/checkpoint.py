"""Sharded checkpoints with torch.distributed.checkpoint (DCP), atomic, reshardable, and the
conversion to / from the single-file safetensors checkpoint of `ultramem.checkpoint`.

A DCP checkpoint is a directory: DCP's shard files and `.metadata`, plus `ultramem.json`
(format, step, model config, extra). Every rank writes its own shards (a table's DTensor shard;
replicated tensors are written once); loading reads whatever slices the loading ranks hold, so a
checkpoint saved at world size 2 loads at 1 (into an unsharded model) or at 4.

Atomicity: the save goes to `.<name>.tmp` next to the target; rank 0 then moves an existing
checkpoint to `.<name>.old`, renames the new one into place and deletes the old one. A crash at
any point leaves either the previous or the new checkpoint loadable (`resolve_dcp` falls back to
`.old` when the target is missing). Nothing here unpickles: DCP's files are read by DCP, JSON by json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import checkpoint as single

FORMAT = "ultramem-dcp"
META_NAME = "ultramem.json"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _side(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}"


def is_dcp(path) -> bool:
    return (Path(path) / ".metadata").is_file()


def resolve_dcp(path) -> Path:
    """`path`, or its `.old` copy when a save crashed between the two renames."""
    path = Path(path)
    for p in (path, _side(path, "old")):
        if is_dcp(p) and (p / META_NAME).is_file():
            return p
    raise single.CheckpointError(f"{path}: no DCP checkpoint here (no .metadata / {META_NAME})")


def _states(model, optimizer) -> dict:
    if optimizer is None:
        return {"model": model.state_dict()}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_dcp(path, model: torch.nn.Module, optimizer=None, *, step: int = 0, model_config: dict | None = None,
             extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Writes model (+ optimizer) state as a DCP directory."""
    path, tmp, old = Path(path), _side(Path(path), "tmp"), _side(Path(path), "old")
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_states(model, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    if _rank0():
        meta = {"format": FORMAT, "step": int(step), "model_config": model_config, "extra": extra or {},
                "has_optimizer": optimizer is not None}
        single.atomic_write_text(tmp / META_NAME, json.dumps(meta))
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        single.fsync_dir(path.parent)
    _barrier()
    return path


def read_dcp_meta(path) -> dict:
    return json.loads((resolve_dcp(path) / META_NAME).read_text())


def load_dcp(path, model: torch.nn.Module, optimizer=None) -> dict:
    """Collective: load into `model` (+ `optimizer`) whatever its sharding; returns ultramem.json."""
    src = resolve_dcp(path)
    meta = json.loads((src / META_NAME).read_text())
    if optimizer is not None and not meta.get("has_optimizer"):
        raise single.CheckpointError(f"{src}: has no optimizer state")
    states = _states(model, optimizer)
    dcp.load(states, checkpoint_id=str(src), no_dist=not dist.is_initialized())
    if optimizer is None:
        model.load_state_dict(states["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optim"])
    return meta


def _read_model_tensors(src: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from a DCP directory, in one process (shapes from DCP's metadata)."""
    md = dcp.FileSystemReader(str(src)).read_metadata()
    sd = {}
    for key, item in md.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            sd[key] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(sd, checkpoint_id=str(src), no_dist=True)
    return {k[len("model."):]: v for k, v in sd.items()}


def dcp_to_safetensors(src, dst) -> Path:
    """A DCP checkpoint's model weights -> one `ultramem.checkpoint` safetensors file (no optimizer)."""
    src = resolve_dcp(src)
    meta = json.loads((src / META_NAME).read_text())
    model_state = _read_model_tensors(src)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst / single.CHECKPOINT_NAME
    tensors = {f"model/{k}": v.contiguous() for k, v in model_state.items()}
    state = {"step": meta.get("step", 0), "model_config": meta.get("model_config"), "train_config": None,
             "model_keys": list(model_state), "aliases": {}, "optimizer": None, "sampler": None,
             "rng": None, "extra": meta.get("extra", {})}
    metadata = {"format": single.FORMAT, "version": str(single.VERSION), "state": json.dumps(state),
                "checksum": single._checksum(tensors)}
    single.atomic_save_file(tensors, metadata, dst)
    return dst


def safetensors_to_dcp(src, dst) -> Path:
    """A single-file checkpoint's model weights -> a DCP directory (loadable at any world size)."""
    ck = single.load_checkpoint(src)
    dst, tmp = Path(dst), _side(Path(dst), "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dcp.save({"model": dict(ck.model_state)}, checkpoint_id=str(tmp), no_dist=True)
    meta = {"format": FORMAT, "step": ck.step, "model_config": ck.model_config, "extra": ck.extra,
            "has_optimizer": False}
    single.atomic_write_text(tmp / META_NAME, json.dumps(meta))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


def convert(src, dst) -> Path:
    """Either direction, decided by what `src` is (a DCP directory or a safetensors checkpoint)."""
    src = Path(src)
    if is_dcp(src) or is_dcp(_side(src, "old")):
        return dcp_to_safetensors(src, dst)
    return safetensors_to_dcp(src, dst)
