"""Checkpoints that never unpickle: ``.safetensors`` tensors plus JSON metadata, written atomically.

A checkpoint is one ``.safetensors`` file. Its tensors are named by what they hold (``student.…``,
``teacher.…``, ``loss.…``, ``optimizer.state.<i>.<name>``); its header carries one JSON document under
the key ``mammodino`` with the format version, the model config, provenance (data, command, git commit,
versions) and whatever the training loop adds (metrics, step, schedule position, RNG states, the
optimiser's hyper-parameters). Optimiser state thus travels as tensors + JSON: no pickle anywhere.

Writes go to a temporary file in the same folder, are flushed to disk, then ``os.replace``d over the
target, so a crash or a full disk leaves either the previous file or the new one, never half of one.
Loading checks the safetensors header itself before handing the file to the ``safetensors`` library,
refuses anything else (a ``torch.save`` zip or pickle, a damaged header) with one line
(:class:`MammoInputError`), and never calls ``torch.load`` or ``pickle``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from training.errors import MammoInputError

FORMAT = "mammodino-checkpoint/1"
METADATA_KEY = "mammodino"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on header size


# --- writing ---------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``metadata`` to ``path`` atomically; returns the path.

    Tensors are moved to the CPU and made contiguous; tensors that share memory are copied apart (the
    safetensors format stores each one once). ``metadata`` must be JSON-serialisable (it is checked
    before anything is written)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MammoInputError(f"checkpoint {path.name}: the name must end in .safetensors")
    document = json.dumps({"format": FORMAT, **metadata}, allow_nan=False, default=_json_default)
    plain: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and (key in seen or key[1] != t.numel() * t.element_size()):
            t = t.clone()  # a view of a larger tensor, or memory another entry holds: store its own copy
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        plain[name] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(plain, str(tmp), metadata={METADATA_KEY: document})
        with open(tmp, "rb+") as f:  # the data must be on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows): the replace is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"checkpoint metadata: {type(value).__name__} is not JSON-serialisable")


# --- reading ---------------------------------------------------------------------------------------

def read_header(path: str | Path) -> dict[str, Any]:
    """The safetensors header (tensor names, dtypes, shapes, offsets and ``__metadata__``), checked by
    hand: anything that is not a well-formed safetensors file raises :class:`MammoInputError`."""
    path = Path(path)
    if not path.is_file():
        raise MammoInputError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        kind = _kind_of(head)
        if len(head) < 8:
            raise MammoInputError(f"{path.name} is not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if kind or n < 2 or n > min(size - 8, _MAX_HEADER):
            raise MammoInputError(f"{path.name} is not a safetensors file{kind}; MammoDINO loads only "
                                  f".safetensors checkpoints and never unpickles")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MammoInputError(f"{path.name}: damaged safetensors header (not JSON); the file cannot be "
                              f"used, take an earlier checkpoint") from None
    if not isinstance(header, dict):
        raise MammoInputError(f"{path.name}: damaged safetensors header (not an object)")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise MammoInputError(f"{path.name}: damaged safetensors header (tensor {name!r} lies outside "
                                  f"the file; truncated?)")
    return header


def _kind_of(head: bytes) -> str:
    """A hint for the error message when the file is a known non-safetensors format."""
    if head.startswith(b"PK\x03\x04"):
        return " (it is a zip archive, as torch.save writes, which holds a pickle)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return " (it is a Python pickle)"
    return ""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without reading its tensors ({} when it has none)."""
    header = read_header(path)
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise MammoInputError(f"{Path(path).name}: its MammoDINO metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise MammoInputError(f"{Path(path).name}: its MammoDINO metadata is not a JSON object")
    return meta


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All tensors of a safetensors file and its MammoDINO metadata ({} for files from elsewhere, such
    as timm or Hugging Face weights)."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MammoInputError(f"{Path(path).name}: unreadable safetensors file ({exc})") from None
    return tensors, meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A MammoDINO checkpoint: its tensors and metadata. Refuses safetensors files that lack our
    metadata or come from a newer format, with one line."""
    tensors, meta = load_tensors(path, device)
    if meta.get("format") != FORMAT:
        found = meta.get("format", "no MammoDINO metadata")
        raise MammoInputError(f"{Path(path).name} is not a MammoDINO checkpoint ({found}; expected {FORMAT})")
    return tensors, meta


# --- state dicts and optimisers as tensors + JSON --------------------------------------------------

def prefixed(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every name under ``prefix.`` (e.g. a module's ``state_dict()`` as ``student.…``)."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors under ``prefix.``, with the prefix removed."""
    start = prefix + "."
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


def optimizer_state(optimizer: torch.optim.Optimizer,
                    prefix: str = "optimizer") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimiser's ``state_dict`` split into tensors (``prefix.state.<i>.<name>``) and JSON (the
    param groups' hyper-parameters and any non-tensor state)."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = json.loads(json.dumps(state["param_groups"], default=_json_default))
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
                         prefix: str = "optimizer") -> None:
    """Inverse of :func:`optimizer_state`: rebuild the ``state_dict`` and load it into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    start = prefix + ".state."
    for key, value in tensors.items():
        if key.startswith(start):
            index, _, name = key[len(start):].partition(".")
            state.setdefault(int(index), {})[name] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):  # JSON has no tuples; Adam keeps its betas as one
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    if len(groups) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups)):
        raise MammoInputError("checkpoint: its optimiser state does not match this model's parameter groups")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- provenance ------------------------------------------------------------------------------------

def provenance(command: list[str] | None = None, data: Any = None, repo: str | Path | None = None) -> dict[str, Any]:
    """Where a checkpoint comes from: command line, data, git commit (``+dirty`` when the tree has
    uncommitted changes; ``null`` outside a git checkout), versions and time."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    commit = None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    import timm

    return {
        "command": list(sys.argv if command is None else command),
        "data": data,
        "git_commit": commit,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
