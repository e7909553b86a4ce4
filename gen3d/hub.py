"""Loading pretrained models: a Hugging Face hub id or a local folder, one code path.

Every model plugin goes through :func:`load_pretrained`, so a user's hub id, a
local ``save_pretrained`` folder and the tests' tiny random models are loaded the
same way. It honours the HF cache (``HF_HOME`` / ``HF_HUB_CACHE``) and offline
mode (``HF_HUB_OFFLINE=1``), and turns the libraries' long errors into one line
that names the model, the recipe key and how to get the weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache() -> Path:
    try:
        from huggingface_hub import constants
        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers/diffusers
        return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def offline() -> bool:
    # Read the environment each time: the libraries read it once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def in_cache(model_id: str) -> bool:
    folder = hub_cache() / ("models--" + model_id.replace("/", "--")) / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def resolve(model_id: str, key: str) -> str:
    """Return what to hand to ``from_pretrained``: a local folder or a hub id.

    Raises a :class:`ConfigError` early (before any network retry loop) when the
    model is neither a folder nor a hub id, or when it is a hub id that offline
    mode cannot find in the cache.
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ConfigError(f"{key}: {model_id!r} is a file; expected a model folder or a hub id like 'org/name'")
    if not HUB_ID.match(model_id) or model_id.startswith((".", "/", "~")):
        raise ConfigError(f"{key}: no model folder {str(path)!r} (and it is not a hub id like 'org/name')")
    if offline() and not in_cache(model_id):
        raise ConfigError(missing_message(model_id, key, "HF_HUB_OFFLINE is set and it is not in the cache"))
    return model_id


def missing_message(model_id: str, key: str, reason: str) -> str:
    return (f"{key}: cannot load {model_id!r}: {reason}. "
            f"Download it once on a machine with internet (`hf download {model_id}`, cached in {hub_cache()}), "
            f"or point {key}=PATH at a local folder written by save_pretrained.")


def load_pretrained(loader: Callable[..., Any], model_id: str, key: str, what: str, **kwargs: Any) -> Any:
    """``loader(source, **kwargs)`` with clear errors. ``what`` names the expected kind of model."""
    source = resolve(model_id, key)
    try:
        return loader(source, **kwargs)
    except OSError as exc:
        if Path(source).is_dir():
            raise ConfigError(f"{key}: {model_id!r} is not a {what} folder ({first_line(exc)})") from None
        raise ConfigError(missing_message(model_id, key, first_line(exc))) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{key}: {model_id!r} does not hold a {what} ({first_line(exc)})") from None
    except RuntimeError as exc:
        # Weights that do not fit the config (a folder of another model size); anything else,
        # e.g. running out of GPU memory, is not the folder's fault and is raised as it is.
        if "size mismatch" not in str(exc) and "loading state_dict" not in str(exc):
            raise
        raise ConfigError(f"{key}: {model_id!r} has weights that do not fit its config ({first_line(exc)})") from None
    except ImportError as exc:  # e.g. a checkpoint whose config asks for timm, which is not installed
        library = exc.name or next(iter(re.findall(r"requires the (\S+) library", str(exc))), None)
        needs = f"the {library} library, which is not installed (`pip install {library}`)" if library else \
            "a library that is not installed"
        raise ConfigError(f"{key}: {model_id!r} needs {needs}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def pick_dtype(setting: str, device: torch.device | str) -> torch.dtype:
    """``auto`` = fp16 on CUDA (bf16 where asked), fp32 on CPU where half precision is slow."""
    device = torch.device(device)
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if setting not in table:
        raise ConfigError(f"dtype must be one of auto, {', '.join(sorted(table))}; got {setting!r}")
    if device.type == "cpu" and table[setting] is torch.float16:
        raise ConfigError("dtype fp16 needs a CUDA device (many CPU kernels have no half version); use fp32 or bf16")
    return table[setting]
