"""Reading, validating and writing MagFace checkpoints without executing code from them.

A MagFace checkpoint is a torch file holding ``{"epoch", "arch", "state_dict", "optimizer"}``;
the backbone's keys sit under ``features.module.``, ``module.features.`` or ``features.``, next
to the training margin head (``fc.weight``, 512 x classes) that inference does not need.
Files are read through :mod:`qmag_ray.storage` (local, ``s3://``, any fsspec URI) and decoded
with ``weights_only=True``: a file that needs more than tensors and plain containers is refused.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qmag_ray import storage
from qmag_ray._text import counted
from qmag_ray.model.registry import backbone_names, canonical_name, create_backbone

logger = logging.getLogger(__name__)

LAYOUTS = ("features.module.", "module.features.", "features.")
"""Key prefixes of the backbone in MagFace checkpoints (distributed, data-parallel, plain)."""
_PREFIXES = (*LAYOUTS, "module.", "")  # also accepted when reading: bare backbone state_dicts
_ANCHOR = "conv1.weight"
# What torch's weights-only unpickler says when a file needs a callable or class to load.
_UNSAFE = re.compile(r"GLOBAL (\S+)|unrecognized function (\S+)|add_safe_globals")
_OPTIONAL_SUFFIX = ".num_batches_tracked"  # a training counter, absent from very old files
_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy (pre-zip) format: a pickled protocol-2 long, the magic 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
MAX_CHECKPOINT_BYTES = 2 * 2**30
"""An iResNet-100 with a margin head for 85k identities and its optimizer state is ~1 GiB."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def _preview(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in total)" if len(items) > limit else "")


def _left_out(dropped: Sequence[str]) -> str:
    """``left out 1 non-backbone key: fc.weight`` (the log line of the keys a load drops)."""
    return f"left out {counted(len(dropped), 'non-backbone key')}: {_preview(dropped)}"


def _plain(value: object) -> object:
    """``value`` if JSON can hold it, else its short text (odd files store tensors as epoch)."""
    return value if isinstance(value, (str, int, float, type(None))) else repr(value)[:80]


def check_container(uri: str, max_bytes: int | None = None) -> int:
    """Refuse, from its size and first bytes, a file that cannot be a torch checkpoint.

    A torch checkpoint is a zip archive (``PK\\x03\\x04``, torch >= 1.6) holding a
    ``*/data.pkl`` record, or the legacy pickle with torch's magic number; a ``*.safetensors``
    file starts with the length of its JSON header and the header itself. Anything else, or
    anything larger than ``max_bytes`` (default ``MAX_CHECKPOINT_BYTES``), is refused before it
    is read whole. Returns the size in bytes.
    """
    where = storage.redact(uri)
    limit = MAX_CHECKPOINT_BYTES if max_bytes is None else max_bytes
    safetensors = uri.lower().endswith(".safetensors")
    try:
        fs, path = storage.filesystem(uri)
        if fs.isdir(path):
            raise CheckpointError(f"checkpoint {where} is a folder, not a file")
        size = int(fs.size(path))
        with fs.open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
            if safetensors and size:
                # 8-byte little-endian header length, then the JSON header
                length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
                if not (head[8:9] == b"{" and 0 < length <= size - 8):
                    raise CheckpointError(
                        f"checkpoint {where} ({size} bytes) is not a safetensors file: its "
                        "header is missing or damaged (refused before reading it)"
                    )
            elif head.startswith(_ZIP_MAGIC):
                f.seek(0)
                try:
                    names = zipfile.ZipFile(f).namelist()  # reads the central directory only
                except zipfile.BadZipFile as exc:
                    raise CheckpointError(
                        f"checkpoint {where} ({size} bytes) is a damaged zip archive ({exc}): "
                        "the file is truncated or not a torch checkpoint"
                    ) from None
                if not any(n.endswith("data.pkl") for n in names):
                    raise CheckpointError(
                        f"checkpoint {where} is a zip archive but not a torch checkpoint "
                        "(no data.pkl record)"
                    )
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {where}") from exc
    if size == 0:
        return 0  # reported by the caller
    if not safetensors and not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC):
        raise CheckpointError(
            f"checkpoint {where} ({size} bytes) is not a torch checkpoint: it is neither a torch "
            "zip archive nor a legacy torch file (refused before reading it)"
        )
    if size > limit:
        raise CheckpointError(
            f"checkpoint {where} is {size / 2**30:.2f} GiB, more than any MagFace checkpoint "
            f"(limit {limit / 2**30:.2f} GiB); refused before reading it"
        )
    return size


def _read_raw(uri: str) -> bytes:
    where = storage.redact(uri)
    check_container(uri)
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise CheckpointError(f"checkpoint not found: {where}") from exc
    if not data:
        raise CheckpointError(
            f"checkpoint {where} is empty (0 bytes): "
            "the file is truncated or not a torch checkpoint"
        )
    return data


def _decode(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _UNSAFE.search(str(exc))
        if unsafe is not None:
            what = unsafe.group(1) or unsafe.group(2) or "a class that is not a tensor"
            raise CheckpointError(
                f"checkpoint {where} is refused: loading it would execute code from the file "
                f"(it references {what}). Only tensors and plain containers are loaded "
                "(torch.load weights_only=True); re-save the weights as a plain state_dict "
                "in a trusted environment."
            ) from None
        raise CheckpointError(
            f"checkpoint {where} ({len(data)} bytes) is truncated or not a torch checkpoint"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError... for bad bytes
        detail = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        raise CheckpointError(
            f"checkpoint {where} ({len(data)} bytes) is truncated or not a torch checkpoint "
            f"({detail})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {where} holds a {type(obj).__name__}, expected a dict "
            "(a MagFace checkpoint or a state_dict)"
        )
    return obj


def _decode_safetensors(data: bytes, where: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return dict(load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {where} ({len(data)} bytes) is truncated or not a safetensors file "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
        ) from None


def read_checkpoint(uri: str) -> dict[str, Any]:
    """Load the dict stored at ``uri`` on the CPU, tensors and plain containers only.

    ``*.safetensors`` files (a flat state dict of one of the registry's architectures, with or
    without MagFace's key prefixes) are read with safetensors, which holds tensors only.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a torch file, or would
            need code execution to load.
    """
    data = _read_raw(uri)
    if uri.lower().endswith(".safetensors"):
        return _decode_safetensors(data, storage.redact(uri))
    return _decode(data, storage.redact(uri))


def _split(
    checkpoint: Mapping[str, Any], where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Backbone tensors (prefix stripped), the detected layout, and the keys left out."""
    inner = checkpoint.get("state_dict")
    state: Mapping[str, Any] = inner if isinstance(inner, Mapping) else checkpoint
    prefix = next((p for p in _PREFIXES if p + _ANCHOR in state), None)
    if prefix is None:
        raise CheckpointError(
            f"{where} has no iResNet backbone: expected a key such as "
            f"'features.module.{_ANCHOR}' or 'module.features.{_ANCHOR}'; "
            f"found {len(state)} keys: {_preview(sorted(map(str, state)))}"
        )
    backbone: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if not str(key).startswith(prefix):
            dropped.append(str(key))
        elif isinstance(value, torch.Tensor):
            backbone[key[len(prefix) :]] = value
        else:
            raise CheckpointError(
                f"{where}: backbone entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return backbone, prefix, dropped


def backbone_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's tensors under their ``IResNet`` names, from a MagFace dict or a state_dict.

    The layout is detected from the keys; everything outside the backbone prefix (the margin
    head ``fc.weight``, for instance) is left out and logged.
    """
    backbone, _, dropped = _split(checkpoint)
    if dropped:
        logger.info("%s", _left_out(dropped))
    return backbone


@functools.cache
def _shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = create_backbone(arch)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _optional(key: str, state: Mapping[str, torch.Tensor]) -> bool:
    """A BatchNorm's ``num_batches_tracked`` may be absent when its weights are present."""
    stem = key[: -len(_OPTIONAL_SUFFIX)]
    return key.endswith(_OPTIONAL_SUFFIX) and f"{stem}.running_mean" in state


def _diff(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``state`` against ``expected``."""
    missing = [key for key in expected if key not in state and not _optional(key, state)]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {expected[key]}"
        for key in expected
        if key in state and tuple(state[key].shape) != expected[key]
    ]
    return missing, unexpected, mismatched


def _fit_error(
    where: str, arch: str, layout: str, stored_arch: object, state: Any, diff: Any
) -> str:
    """The message for a checkpoint whose keys differ from ``arch``'s (``diff`` from _diff)."""
    missing, unexpected, mismatched = diff
    lines = [
        f"checkpoint {where} (layout {layout!r}) does not fit the architecture {arch!r}:",
        f"  {len(missing)} missing keys: {_preview(missing) or '-'}",
        f"  {len(unexpected)} unexpected keys: {_preview(unexpected) or '-'}",
        f"  {len(mismatched)} shape mismatches (checkpoint vs model): "
        + (_preview(mismatched) or "-"),
    ]
    if stored_arch is not None:
        lines.append(f"  the checkpoint's own 'arch' entry says {stored_arch!r}")
    matches = [n for n in backbone_names() if n != arch and not any(_diff(state, _shapes(n)))]
    if matches:
        lines.append(f"  its keys and shapes match {' / '.join(matches)}: pass arch={matches[0]!r}")
    return "\n".join(lines)


def _build(
    checkpoint: dict[str, Any], arch: str, where: str, kwargs: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    arch = canonical_name(arch)
    state, layout, dropped = _split(checkpoint, f"checkpoint {where}")
    with torch.device("meta"):
        model = create_backbone(arch, **kwargs)
    expected = model.state_dict()
    diff = _diff(state, {key: tuple(value.shape) for key, value in expected.items()})
    if any(diff):
        raise CheckpointError(_fit_error(where, arch, layout, checkpoint.get("arch"), state, diff))
    full = {
        key: state[key].to(dtype=ref.dtype).contiguous()
        if key in state
        else torch.zeros((), dtype=ref.dtype)
        for key, ref in expected.items()
    }
    model.load_state_dict(full, strict=True, assign=True)
    if dropped:
        logger.info("%s: %s", where, _left_out(dropped))
    info = {
        "uri": where,
        "arch": arch,
        "checkpoint_arch": _plain(checkpoint.get("arch")),
        "epoch": _plain(checkpoint.get("epoch")),
        "layout": layout,
        "tensors": len(state),
        "dropped_keys": dropped[:20],
        "n_dropped_keys": len(dropped),
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding_size": getattr(model, "embedding_size", None),
        "input_size": getattr(model, "input_size", None),
    }
    return model, info


def load_backbone(uri: str, arch: str, device: str = "cpu", **kwargs: Any) -> nn.Module:
    """The backbone ``arch`` with the weights at ``uri``, in eval mode on ``device``.

    Every backbone key must be present with its exact shape. ``kwargs`` go to the backbone
    factory (e.g. ``embedding_size``); ``device`` may be ``"auto"`` (see :func:`select_device`).

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit ``arch`` (the message
            lists missing, unexpected and mismatched keys and names a fitting arch if any).
        ValueError: unknown ``arch`` or unavailable ``device``.
    """
    target = select_device(device)
    where = storage.redact(uri)
    model, info = _build(read_checkpoint(uri), arch, where, kwargs)
    logger.info("loaded %s from %s (layout %r)", info["arch"], where, info["layout"])
    return model.to(target).eval()


def describe_checkpoint(uri: str, arch: str, **kwargs: Any) -> dict[str, Any]:
    """Fully validate ``uri`` against ``arch`` on the CPU and describe it (JSON-friendly).

    Meant to run before any cluster work so that a wrong file or arch fails in seconds.
    Returns the redacted ``uri``, ``arch``, ``checkpoint_arch``, ``epoch``, ``layout``,
    ``tensors``, ``dropped_keys``, ``parameters``, ``embedding_size``, ``input_size``,
    ``bytes`` and ``sha256``.
    """
    data = _read_raw(uri)
    where = storage.redact(uri)
    _, info = _build(_decode(data, where), arch, where, kwargs)
    return {**info, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(
    model: nn.Module,
    uri: str,
    arch: str,
    layout: str = "features.module.",
    epoch: int = 0,
    extra_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``model`` at ``uri`` in MagFace's layout (``epoch``, ``arch``, ``state_dict``,
    ``optimizer``), the backbone keys under ``layout``.

    ``extra_state`` entries are stored verbatim next to the backbone (e.g. a margin head
    ``fc.weight``), to mimic a training checkpoint.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {list(LAYOUTS)}")
    state = {layout + key: value.detach().cpu() for key, value in model.state_dict().items()}
    for key, value in (extra_state or {}).items():
        if key in state:
            raise ValueError(f"extra_state key {key!r} collides with a backbone key")
        state[key] = value.detach().cpu()
    payload = {"epoch": int(epoch), "arch": canonical_name(arch), "state_dict": state}
    buffer = io.BytesIO()
    torch.save({**payload, "optimizer": {}}, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def select_device(prefer: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named device, if usable.

    Raises:
        ValueError: an unknown device name, or CUDA asked for where there is none.
    """
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {prefer!r}; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {prefer!r} requested but CUDA is not available here")
    return device
