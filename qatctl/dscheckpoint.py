"""DeepSpeed checkpoints without pickles: a checkpoint engine that writes each state dict DeepSpeed
hands it as one safetensors file (tensors) with the structure around them as JSON in the file's
metadata, and reads it back with nothing but the safetensors and JSON parsers.

DeepSpeed's own TorchCheckpointEngine saves with torch.save and loads with torch's full,
unrestricted unpickler: a crafted file in a resume folder would run code when the user
re-runs the command. Here, loading can only ever build tensors, numbers, strings, lists, tuples,
dicts and the few named values below (torch dtypes, DeepSpeed's ZeRO stage enum, its loss scaler
rebuilt from its attributes); anything else is refused when saving.

    trainer.engine.checkpoint_engine = SafetensorsCheckpointEngine()   # after deepspeed.initialize
"""

from __future__ import annotations

import enum
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qatctl.errors import QatctlError

FORMAT = "qatctl-ds-state-v1"


def _enums() -> dict[str, type]:
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return {"ZeroStageEnum": ZeroStageEnum}


def _objects() -> dict[str, type]:
    """Plain-attribute objects DeepSpeed keeps in its state dicts: stored as their attributes
    (themselves encoded by these rules) and rebuilt without running their constructors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    return {"LossScaler": LossScaler, "DynamicLossScaler": DynamicLossScaler}


def encode(obj, tensors: dict, path: str = "s"):
    """obj -> a JSON-able skeleton; tensors go to `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor": path}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        name = type(obj).__name__
        if name not in _enums():
            raise QatctlError(f"DeepSpeed checkpoint: cannot store a {type(obj).__qualname__} at {path}")
        return {"__enum": name, "value": obj.value}
    if isinstance(obj, int):
        return obj
    if type(obj).__name__ in _objects() and type(obj) is _objects()[type(obj).__name__]:
        return {"__object": type(obj).__name__, "attrs": encode(vars(obj), tensors, path)}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"__dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.Size):
        return {"__size": list(obj)}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict": {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        return {"__items": [[encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                            for i, (k, v) in enumerate(obj.items())]}
    raise QatctlError(f"DeepSpeed checkpoint: cannot store a {type(obj).__qualname__} at {path} without pickle")


def decode(obj, tensors):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor" in obj:
        return tensors(obj["__tensor"])
    if "__dict" in obj:
        return {k: decode(v, tensors) for k, v in obj["__dict"].items()}
    if "__items" in obj:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj["__items"]}
    if "__tuple" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple"])
    if "__float" in obj:
        return float(obj["__float"])
    if "__dtype" in obj:
        dtype = getattr(torch, obj["__dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {obj['__dtype']!r}")
        return dtype
    if "__size" in obj:
        return torch.Size(obj["__size"])
    if "__enum" in obj:
        return _enums()[obj["__enum"]](obj["value"])
    if "__object" in obj:
        cls = _objects()[obj["__object"]]
        inst = cls.__new__(cls)
        inst.__dict__.update(decode(obj["attrs"], tensors))
        return inst
    raise ValueError(f"unknown entry {sorted(obj)}")


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k


def save(state_dict, path: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode(state_dict, tensors)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT, "skeleton": json.dumps(skeleton)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str, map_location=None):
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise QatctlError(f"{path}: not a qatctl DeepSpeed state file (format {meta.get('format')!r}); "
                                  "start over with --no-resume")
            skeleton = json.loads(meta["skeleton"])
            state = decode(skeleton, f.get_tensor)
    except QatctlError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable state is one clear error
        raise QatctlError(f"{path}: unreadable DeepSpeed state ({type(e).__name__}: {e}); "
                          "start over with --no-resume") from None
    if isinstance(map_location, (str, torch.device)):  # a callable (storage, loc) -> storage keeps CPU
        state = _to(state, map_location)
    return state


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    return obj


def checkpoint_engine():
    """A DeepSpeed CheckpointEngine that stores state as above."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafetensorsCheckpointEngine(CheckpointEngine):
        def __init__(self):
            super().__init__(None)
            self.name = "qatctl SafetensorsCheckpointEngine"

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            save(state_dict, path)

        def load(self, path: str, map_location=None):
            return load(path, map_location)

        def commit(self, info):
            return True

    return SafetensorsCheckpointEngine()
