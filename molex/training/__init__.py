"""One way to train: the optimizer, schedule and clipping (:mod:`~molex.training.optim`), the in-memory
loop (:mod:`~molex.training.loop`) and the registry of routers fitted on labelled texts
(:mod:`~molex.training.fitters`). All pure torch, importable without Lightning.

The loss (:mod:`molex.training.objective`) needs :mod:`molex.inject` and is imported from there.
Lightning's ``MoLEModule`` builds its optimizer, schedule and loss from these same pieces.
"""

from molex.training.dlp import train_dlp_classifier  # registers dlp's text fitter
from molex.training.fitters import TextFitter, get_text_fitter, register_text_fitter
from molex.training.loop import train_steps
from molex.training.optim import OptimSettings, build_optimizer, build_scheduler, clip_gradients, warmup_cosine

__all__ = [
    "OptimSettings",
    "TextFitter",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "get_text_fitter",
    "register_text_fitter",
    "train_dlp_classifier",
    "train_steps",
    "warmup_cosine",
]
