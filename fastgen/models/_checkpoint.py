"""Checkpoint files of the reference models: written whole or not at all, read as plain tensors only.

Reading uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers load; a file
that would run pickled code is refused. Every refusal says why.
"""
import importlib.resources
import os
import pickle
import re
import warnings

import torch

from fastgen._files import atomic_write

REFUSED_CODE = "refused: contains pickled code, loading only plain tensors (weights_only=True)"


def save(state: dict, path) -> None:
    """``torch.save(state)`` to ``path`` through the atomic writer: a failed write leaves the old file."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _torch_load(path, fmt: str, map_location):
    """``torch.load(path, weights_only=True)``; ValueError saying why a readable file was refused."""
    refused = f"path must be a {fmt} checkpoint, got {path!r}: "
    try:
        with warnings.catch_warnings():  # the weights-only reader warns about pickle protocols before refusing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        code = re.search(r"GLOBAL ([\w.]+)", str(err))  # the weights-only reader refused a function or class
        if code:
            raise ValueError(refused + f"{REFUSED_CODE}; it names {code.group(1)}") from None
        raise ValueError(refused + f"not a fastgen checkpoint (unreadable: {type(err).__name__})") from None
    except Exception as err:  # torch.load's errors for foreign bytes: KeyError, EOFError, RuntimeError, ...
        raise ValueError(refused + f"not a fastgen checkpoint (unreadable: {type(err).__name__})") from None


def load(path, fmt: str, *, map_location="cpu") -> dict:
    """The dict saved in the checkpoint file ``path``, whose "format" must be ``fmt``.

    FileNotFoundError / IsADirectoryError when ``path`` is not a file; ValueError when the file is not
    a fastgen checkpoint, would run pickled code, or is a checkpoint of another format."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path must be a {fmt} checkpoint file, got {path!r}, which does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path must be a {fmt} checkpoint file, got the directory {path!r}")
    state = _torch_load(path, fmt, map_location)
    if not isinstance(state, dict) or not isinstance(state.get("format"), str):
        raise ValueError(f"path must be a {fmt} checkpoint, got {path!r}: not a fastgen checkpoint "
                         f"(a {type(state).__name__} without a 'format' entry)")
    if state["format"] != fmt:
        raise ValueError(f"path must be a {fmt} checkpoint, got {path!r}: its format is {state['format']!r}")
    return state


def architecture(state: dict, allowed: dict, path):
    """``allowed[state["architecture"]]``: what builds the network of a loaded checkpoint. ValueError naming
    the file, the architecture it names and those allowed when it names another."""
    name = state.get("architecture")
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"path must be a {state['format']} checkpoint of a known architecture, got {str(path)!r}: "
                         f"its architecture is {name!r}, not one of {sorted(allowed)}")
    return allowed[name]


def build(state: dict, path, make, config, weights, **kwargs):
    """``make(**config, **kwargs)`` (a module) with ``weights`` loaded: a network a loaded checkpoint
    describes. ValueError naming the file when its config does not fit ``make`` or its weights do not
    fit that network: a short first line, then torch's details on the next ones."""
    refused = f"path must be a {state['format']} checkpoint, got {str(path)!r}: "
    if not isinstance(config, dict) or not isinstance(weights, dict):
        raise ValueError(refused + "its config or weights are missing (not dicts)")
    name = getattr(make, "__name__", "network")
    try:
        module = make(**config, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(refused + f"its config does not fit {name}\n{err}") from None
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:  # size mismatch, missing or unexpected keys, a non-tensor value
        raise ValueError(refused + f"its weights do not fit the {name} its config describes\n{err}") from None
    return module


def shipped_path(shipped: dict, name: str):
    """Path of the checkpoint ``shipped[name]`` (a file name) shipped in fastgen/checkpoints."""
    if name not in shipped:
        raise ValueError(f"name must be one of {sorted(shipped)}, got {name!r}")
    return importlib.resources.files("fastgen") / "checkpoints" / shipped[name]
