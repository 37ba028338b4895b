"""A checkpoint's resume state without pickles: its tensors in `state.safetensors`, the rest in `state.json`.

Resume state is a nest of dicts, lists and tuples around tensors (optimizer and GradScaler state, RNG
states, scheduler state, the run's position and settings). `torch.save` would pickle it, and hosts
guard `torch.load`: A1111's `modules/safe.py` replaces it with a restricted unpickler that refuses
files newer torch writes, and torch's own `weights_only` loader refuses numpy arrays. So no unpickler
reads this format at all: every tensor goes into one safetensors file under the path it had in the
nest (`optimizer/state/0/exp_avg`), and the nest itself into JSON, with small tags for what JSON lacks:

    {"__tuple__": [...]}            a tuple (Python's RNG state must come back as one)
    {"__dict__": [[key, value]]}    a dict whose keys are not all plain strings (optimizer state: ints)
    {"__tensor__": "name"}          a tensor in state.safetensors; the same tensor object twice is one
                                    entry named twice (bitsandbytes shares its quantization maps)
    {"__ndarray__": {...}}          a numpy array (numpy's RNG state: 624 integers), dtype and values

JSON writes floats with Python's repr, so every float comes back bit for bit, NaN and infinity too.
Only `safetensors.torch.save_file/load_file` and `json` are used: both exist in every version a host
pins (A1111 1.10 ships torch 2.1.2 with safetensors 0.4.2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "inplace-lora-trainer resume state"
VERSION = 1
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
_TAGS = ("__tuple__", "__dict__", "__tensor__", "__ndarray__")


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}  # id(tensor) -> name, so a shared tensor is stored once
        self.keep: list[torch.Tensor] = []  # holds the originals so their ids stay unique meanwhile

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):  # a numpy scalar: its Python value
            return self.encode(value.item(), path)
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self._tensor(value, path)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": {"dtype": value.dtype.str, "shape": list(value.shape),
                                    "values": value.ravel().tolist()}}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in value):
                return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
            return {"__dict__": [[self.encode(k, path), self.encode(v, f"{path}/{k}")] for k, v in value.items()]}
        raise TypeError(f"resume state at '{path}' holds a {type(value).__name__}, which the checkpoint format "
                        f"cannot store (tensors, numpy arrays, numbers, strings, lists, tuples and dicts only)")

    def _tensor(self, tensor: torch.Tensor, path: str) -> str:
        name = self.names.get(id(tensor))
        if name is None:
            name = path.lstrip("/")
            while name in self.tensors:
                name += "_"
            # a fresh contiguous CPU copy: safetensors refuses tensors that share memory (views of one buffer)
            self.tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
            self.names[id(tensor)] = name
            self.keep.append(tensor)
        return name


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, body), = value.items()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in body)
        if tag == "__dict__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
        if tag == "__tensor__":
            return tensors[body]
        if tag == "__ndarray__":
            return np.array(body["values"], dtype=np.dtype(body["dtype"])).reshape(body["shape"])
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write `state` (a dict with string keys) as state.safetensors + state.json in `folder`."""
    encoder = _Encoder()
    body = {k: encoder.encode(v, k) for k, v in state.items()}
    # no safetensors metadata: safetensors 0.4.2 (A1111's) cannot read back a file with metadata and no
    # tensors; the format is named in the JSON
    save_file(encoder.tensors, str(folder / TENSORS_FILE))
    text = json.dumps({"format": FORMAT, "version": VERSION, "state": body}, indent=1)
    (folder / JSON_FILE).write_text(text, encoding="utf-8")


def load_state(folder: Path) -> dict[str, Any]:
    """The dict `save_state` wrote, tensors on the CPU; ValueError if the files are not this format."""
    data = json.loads((folder / JSON_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{folder / JSON_FILE} is not a resume state of this trainer")
    if data.get("version", 0) > VERSION:
        raise ValueError(f"{folder / JSON_FILE} was written by a newer version of the trainer "
                         f"(format {data['version']}, this one reads {VERSION}); update the trainer to resume it")
    tensors = load_file(str(folder / TENSORS_FILE))
    return {k: _decode(v, tensors) for k, v in data["state"].items()}
