"""Files that are never half-written: atomic writes, paths kept inside the run folder, checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import Gen3DError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in 0..1 as 8-bit (rounded, clipped)."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_gif(path: Path, frames: list[np.ndarray], frame_ms: int = 80) -> None:
    """A looping GIF of float 0..1 frames, written atomically (turntable previews)."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack([to_uint8(f) for f in frames]), extension=".gif", duration=frame_ms, loop=0)


def inside(root: Path, relative: str | Path) -> Path:
    """``root / relative``, refusing anything that would land outside ``root``."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise Gen3DError(f"output path {str(relative)!r} would leave the output folder {root}")
    return target


# --- checkpoints: nested state -> safetensors (tensors) + JSON (everything else) -----------


def _split(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[_split(k, f"{prefix}/k{i}", tensors), _split(v, f"{prefix}/{i}", tensors)]
                             for i, (k, v) in enumerate(state.items())]}
    if isinstance(state, (list, tuple)):
        items = [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(state)]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot checkpoint a {type(state).__name__} at {prefix}")


def _join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {_join(k, tensors): _join(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(_join(v, tensors) for v in skeleton["__tuple__"])
    if isinstance(skeleton, list):
        return [_join(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts/lists of tensors and plain values) atomically as safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"gen3d": json.dumps(skeleton)})


def load_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads(f.metadata()["gen3d"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:
        raise Gen3DError(f"checkpoint {path} cannot be read ({exc}); delete it or run without --resume") from exc
    return _join(skeleton, tensors)
