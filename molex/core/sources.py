"""One rule for telling a local path from a hub name, shared by the model loader, the data readers and the CLI.

Hub names are ``name`` or ``owner/name``. Anything else that names a file or folder is local:
an absolute, dot-relative or home-based path, a Windows path, a path two or more folders deep, or a
name ending in a data or weights file suffix. A name that passes none of these tests may still be a
local folder (``data/train``): loaders look for it on disk before asking the hub.
"""

from __future__ import annotations

__all__ = ["LOCAL_SUFFIXES", "looks_like_path"]

#: suffixes of the files molex reads (data files, GGUF weights, safetensors); no hub name ends in them
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".gguf", ".safetensors")


def looks_like_path(name: str) -> bool:
    """True when ``name`` can only be a local path, never a hub name (see the module docstring)."""
    return (
        name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.lower().endswith(LOCAL_SUFFIXES)
    )
