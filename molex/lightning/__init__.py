"""Lightning integration: :class:`MoLEModule` (imported explicitly; ``import molex`` never loads Lightning)."""

from molex.lightning.module import MoLEModule, warmup_cosine

__all__ = ["MoLEModule", "warmup_cosine"]
