"""Keep the quantization libraries' notices that say nothing about a run out of its output.

``transformers`` imports torchao whenever it is installed (its torchao quantizer is imported with the
modeling code), so with ``molex-lora[quant]`` every model load imported it, and torchao announced on import
that its optional GPU extensions (``_C_mxfp8``, ``_C_cutlass_90a``) do not load here and that the Enum
types it registers with ``torch.compile`` are natively supported now. bitsandbytes on CPU announces that
it could not fetch an optional kernel from the hub (it runs its own CPU code instead, and molex never
fetches code), and its ``Linear8bitLt`` warns on every call that it casts float32 inputs to float16, which
filled an 8-bit default run's log with thousands of identical lines. :func:`install` drops the
announcements and keeps the first of each repeated warning, keeping what it dropped for
:func:`suppressed` (the torchao schemes log it at debug level when a torchao base is built). Every other
message still prints, and nothing is imported to do this.
"""

from __future__ import annotations

import logging

__all__ = ["install", "suppressed"]

#: the loggers and their notices: (logger name, text every such message contains, whether the first one prints)
_NOTICES = (
    ("torchao", "Could not load this library", False),
    ("torch.utils._pytree", "is now natively supported by torch.compile as an opaque value type", False),
    ("bitsandbytes.backends.cpu.ops", "from kernels-community", False),
    ("bitsandbytes.autograd._functions", "inputs will be cast from", True),
)


class _NoticeFilter(logging.Filter):
    """Drops the records of one logger whose message contains ``text`` (all of them, or all but the first when
    ``keep_first``), and keeps what it dropped in ``dropped``."""

    def __init__(self, text: str, *, keep_first: bool = False) -> None:
        super().__init__()
        self.text = text
        self.keep_first = keep_first
        self.seen = 0
        self.dropped: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.text not in message:
            return True
        self.seen += 1
        if self.keep_first and self.seen == 1:
            return True
        if len(self.dropped) < 100:  # a repeated warning is kept a hundred times at most
            self.dropped.append(message)
        return False


def _filters() -> list[_NoticeFilter]:
    return [f for name, *_ in _NOTICES for f in logging.getLogger(name).filters if isinstance(f, _NoticeFilter)]


def install() -> None:
    """Put the filters on their loggers (once; the loggers need not exist yet, so torchao is not imported)."""
    if _filters():
        return
    for name, text, keep_first in _NOTICES:
        logging.getLogger(name).addFilter(_NoticeFilter(text, keep_first=keep_first))


def suppressed() -> list[str]:
    """The notices dropped so far, oldest first within each logger."""
    return [message for f in _filters() for message in f.dropped]
