"""Keep torchao's import-time notices out of runs that never asked for a quantized base.

``transformers`` imports torchao whenever it is installed (its torchao quantizer is imported with the
modeling code), so with ``molex-lora[quant]`` every model load imported it, and torchao announced on import
that its optional GPU extensions (``_C_mxfp8``, ``_C_cutlass_90a``) do not load here and that the Enum
types it registers with ``torch.compile`` are natively supported now. None of that is about anything a
run does: :func:`install` drops exactly those records, keeping them for :func:`suppressed` (the torchao
schemes log them at debug level when a torchao base is built). Every other torchao or torch message
still prints, and nothing is imported to do this.
"""

from __future__ import annotations

import logging

__all__ = ["install", "suppressed"]

#: the loggers and the notices dropped from each: (logger name, text every such message contains)
_NOTICES = (
    ("torchao", "Could not load this library"),
    ("torch.utils._pytree", "is now natively supported by torch.compile as an opaque value type"),
)


class _ImportNoticeFilter(logging.Filter):
    """Drops the records of one logger whose message contains ``text``, and keeps them in ``dropped``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.dropped: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.text in message:
            self.dropped.append(message)
            return False
        return True


def _filters() -> list[_ImportNoticeFilter]:
    return [f for name, _ in _NOTICES for f in logging.getLogger(name).filters if isinstance(f, _ImportNoticeFilter)]


def install() -> None:
    """Put the filters on their loggers (once; the loggers need not exist yet, so torchao is not imported)."""
    if _filters():
        return
    for name, text in _NOTICES:
        logging.getLogger(name).addFilter(_ImportNoticeFilter(text))


def suppressed() -> list[str]:
    """The notices dropped so far, oldest first within each logger."""
    return [message for f in _filters() for message in f.dropped]
