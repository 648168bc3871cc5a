"""Atomic, pickle-free checkpoints in one safetensors file.

A checkpoint file holds every tensor (model weights under "model/", optimiser state under
"optim/", RNG states under "rng/", data-sampler tensors under "sampler/") plus one JSON string
in the safetensors metadata with everything else: step, model and train config, the non-tensor
parts of optimiser / RNG / sampler state, and a blake2b checksum of all tensor bytes.
One file means one os.replace, so a crash mid-save never leaves a half-new checkpoint.
Nothing here calls torch.load or pickle: JSON and safetensors cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "ultramem-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model/optimiser."""


def resolve_checkpoint(path) -> Path:
    """A run directory means its checkpoint.safetensors; a file path is used as given."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    return p


# ---------------------------------------------------------------- JSON <-> tensors encoding

def _encode(obj, key: str, tensors: dict):
    """Turn nested state into JSON-able data; tensors / arrays go to `tensors` by unique key."""
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse:
            raise CheckpointError(f"cannot store sparse tensor at '{key}'")
        k = key if key not in tensors else f"{key}#{len(tensors)}"
        tensors[k] = obj.detach()
        return {"__tensor__": k}
    if isinstance(obj, np.ndarray):
        k = key if key not in tensors else f"{key}#{len(tensors)}"
        tensors[k] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": k}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        # non-string keys (optimizer state is keyed by int): keep key types via an item list
        return {"__items__": [[_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise CheckpointError(f"cannot store a {type(obj).__name__} at '{key}' without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


def _checksum(tensors: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ---------------------------------------------------------------- RNG

def capture_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_deep_tuple(state["python"]))
    np.random.set_state(tuple(state["numpy"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _deep_tuple(x):
    return tuple(_deep_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- save

def _model_tensors(model: torch.nn.Module, tensors: dict) -> dict:
    """Put model.state_dict() into `tensors`; tied / shared tensors are stored once + an alias."""
    aliases, seen, storages = {}, {}, set()
    for name, t in model.state_dict().items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        # safetensors refuses tensors that share memory; partial views of one storage are cloned
        t = t.clone() if (t.numel() and ptr in storages) else t.contiguous()
        storages.add(ptr)
        tensors[f"model/{name}"] = t
    return aliases


def atomic_save_file(tensors: dict, metadata: dict, path: Path) -> None:
    """safetensors save to a temp file in the same dir, fsync, os.replace, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; durability is best effort there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path, model: torch.nn.Module, *, step: int = 0, optimizer=None,
                    model_config: dict | None = None, train_config: dict | None = None,
                    sampler_state=None, rng: bool = True, extra: dict | None = None) -> Path:
    """Write model (+ optimiser, RNG, sampler) state atomically; returns the file path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CHECKPOINT_NAME
    tensors: dict[str, torch.Tensor] = {}
    aliases = _model_tensors(model, tensors)
    state = {
        "step": int(step),
        "model_config": model_config,
        "train_config": train_config,
        "model_keys": list(model.state_dict().keys()),
        "aliases": aliases,
        "optimizer": _encode(optimizer.state_dict(), "optim", tensors) if optimizer is not None else None,
        "sampler": _encode(sampler_state, "sampler", tensors),
        "rng": _encode(capture_rng_state(), "rng", tensors) if rng else None,
        "extra": _encode(extra or {}, "extra", tensors),
    }
    tensors = {k: (v.cpu() if v.device.type != "cpu" else v) for k, v in tensors.items()}
    metadata = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(state),
                "checksum": _checksum(tensors)}
    atomic_save_file(tensors, metadata, path)
    return path


# ---------------------------------------------------------------- load

@dataclass
class Checkpoint:
    path: Path
    step: int
    model_config: dict | None
    train_config: dict | None
    sampler_state: object = None
    rng_state: dict | None = None
    optimizer_state: dict | None = None
    extra: dict = field(default_factory=dict)
    model_state: dict = field(default_factory=dict)


def _read_header(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ultramem checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')!r}, "
                              f"this code reads {VERSION}")
    try:
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is damaged: {e}") from e
    return {"state": state, "checksum": meta.get("checksum")}


def read_checkpoint_meta(path) -> dict:
    """The JSON state (step, model_config, train_config, ...) without reading any tensor."""
    return _read_header(resolve_checkpoint(path))["state"]


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) config dicts."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif _plain(a) != _plain(b):
            out.append(f"{prefix}{k}: checkpoint has {a!r}, this run has {b!r}")
    return out


def _plain(x):
    # JSON turns tuples into lists; compare them as equal
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def load_checkpoint(path, model: torch.nn.Module | None = None, optimizer=None, *,
                    expect_model_config: dict | None = None, restore_rng: bool = False,
                    verify: bool = True, normalize_config=None) -> Checkpoint:
    """Read a checkpoint and (optionally) load it into model / optimizer / global RNGs.

    Raises CheckpointError naming the file and the problem when the file is damaged, was written
    for a different model config, or does not fit the given model or optimiser. normalize_config
    maps the saved model config to today's form before it is compared (older checkpoints).
    """
    path = resolve_checkpoint(path)
    header = _read_header(path)
    state = header["state"]
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors (corrupt or truncated?): {e}") from e
    if verify and header["checksum"] != _checksum(tensors):
        raise CheckpointError(f"{path}: checksum mismatch, the tensor data is corrupt")

    if expect_model_config is not None and state.get("model_config") is not None:
        saved = state["model_config"]
        if normalize_config is not None:
            try:
                saved = normalize_config(saved)
            except ValueError as e:
                raise CheckpointError(f"{path}: its model config is not valid today: {e}") from None
        diff = config_diff(saved, expect_model_config)
        if diff:
            raise CheckpointError(f"{path}: written for a different model config: " + "; ".join(diff))

    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    for name, target in state.get("aliases", {}).items():
        model_state[name] = model_state[target]
    ckpt = Checkpoint(path=path, step=state["step"], model_config=state.get("model_config"),
                      train_config=state.get("train_config"), model_state=model_state,
                      sampler_state=_decode(state.get("sampler"), tensors),
                      rng_state=_decode(state.get("rng"), tensors),
                      optimizer_state=_decode(state.get("optimizer"), tensors),
                      extra=_decode(state.get("extra"), tensors) or {})
    if model is not None:
        load_model_state(model, model_state, path)
    if optimizer is not None:
        if ckpt.optimizer_state is None:
            raise CheckpointError(f"{path}: has no optimizer state (saved for inference only?)")
        load_optimizer_state(optimizer, ckpt.optimizer_state, path)
    if restore_rng:
        if ckpt.rng_state is None:
            raise CheckpointError(f"{path}: has no RNG state")
        restore_rng_state(ckpt.rng_state)
    return ckpt


def load_model_state(model: torch.nn.Module, sd: dict, path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def _few(items: list, n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _check_torch_optimizer(opt: torch.optim.Optimizer, sd: dict, where: str) -> None:
    if hasattr(opt, "check_state_shapes"):  # per-row state (SparseValueAdamW): it knows its shapes
        try:
            opt.check_state_shapes(sd)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    if len(ids) != len(params):
        raise CheckpointError(f"{where}: optimizer state has {len(ids)} params, the optimizer {len(params)}")
    pos = {pid: n for n, pid in enumerate(ids)}
    for pid, st in sd["state"].items():
        p = params[pos[pid]]
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape != p.shape:
                raise CheckpointError(f"{where}: optimizer state '{k}' of param #{pos[pid]} has shape "
                                      f"{tuple(v.shape)}, the param has {tuple(p.shape)}")


def load_optimizer_state(optimizer, sd: dict, path) -> None:
    try:
        if isinstance(optimizer, torch.optim.Optimizer):
            _check_torch_optimizer(optimizer, sd, str(path))
        else:  # ultramem.optim.Optimizer: a dict of torch optimiser states
            parts = optimizer.parts()
            if any((opt is None) != (sd.get(key) is None) for key, opt in parts):
                saved = [k for k, _ in parts if sd.get(k) is not None]
                mine = [k for k, opt in parts if opt is not None]
                raise CheckpointError(f"{path}: optimizer state has parts {saved} (value path), this "
                                      f"optimizer has {mine} (sparse_values={optimizer.sparse_values}; "
                                      f"value paths: {optimizer.describe_value_paths()})")
            for key, opt in parts:
                if opt is not None:
                    _check_torch_optimizer(opt, sd[key], f"{path} [{key}]")
        optimizer.load_state_dict(sd)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit: {e}") from e
