"""Adapters whose ``dlp`` router reads an external sentence encoder, written to real folders.

The encoder folder holds only a tiny BERT config: building the router reads the encoder's width from
it, and these tests are about which folders an adapter's config may make molex read.
"""

from __future__ import annotations

import json
from pathlib import Path

import molex
from tests.helpers.models import tiny_llama

__all__ = ["ENCODER_WIDTH", "encoder_adapter", "encoder_folder", "point_encoder"]

#: hidden size of the tiny encoder: the width of the router's classifier
ENCODER_WIDTH = 24


def encoder_folder(path: Path) -> Path:
    """A folder holding a tiny BERT config (``hidden_size`` :data:`ENCODER_WIDTH`), as an encoder folder does."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=64, hidden_size=ENCODER_WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config.save_pretrained(str(path))
    return path


def encoder_adapter(folder: Path, encoder: Path | str | None, source: str = "encoder") -> Path:
    """Save to ``folder`` the adapter of a 2-layer tiny Llama whose ``dlp`` router has ``encoder_path=encoder``."""
    options = {"embedding_source": source, "encoder_path": None if encoder is None else str(encoder)}
    config = molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="dlp", router_options=options)
    return molex.save_adapter(molex.inject(tiny_llama(num_layers=2), config), folder)


def point_encoder(folder: Path, encoder: Path | str) -> Path:
    """Rewrite the saved adapter config in ``folder`` so its router names ``encoder`` (as an edited or
    downloaded config may); returns ``folder``."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["mole_config"]["router"]["options"]["encoder_path"] = str(encoder)
    path.write_text(json.dumps(data))
    return folder
