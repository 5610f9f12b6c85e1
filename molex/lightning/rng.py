"""``TrainingRNG``: the random stream of the training steps, kept apart from torch's global one.

Dropout on the experts' input and router noise (``jitter_noise``) draw from torch's global generator, and
so does much else between two steps: every ``DataLoader`` iterator without a generator of its own
(validation, evaluation) draws its base seed from it. Saving the global state in a checkpoint is then not
enough: an uninterrupted run validates after step ``k`` and so shifts the stream before step ``k + 1``,
while a run resumed from step ``k`` skips that validation (it already happened). Here the steps draw
from a stream of their own: its state is swapped in for the span of each training batch and swapped out
again afterwards, so only training steps advance it, and it is what a checkpoint stores.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TrainingRNG"]


def _capture(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.random.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.random.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainingRNG:
    """Swap a dedicated CPU (and CUDA, on a CUDA device) generator state in and out around training steps.

    The first step starts from the global state at that moment (so a run is still fixed by its seed);
    later steps continue the dedicated stream, whatever else draws from the global one in between.
    """

    def __init__(self) -> None:
        self._state: dict[str, torch.Tensor] | None = None  # the stream, while no step runs
        self._outside: dict[str, torch.Tensor] | None = None  # the global state, while a step runs

    @property
    def active(self) -> bool:
        """Whether a training step is running (the stream is the global generator's state)."""
        return self._outside is not None

    def enter(self, device: torch.device) -> None:
        """Start a step: keep the global state aside and continue the training stream."""
        if self.active:  # the previous step raised before `exit`: the global generator still holds the stream
            return
        self._outside = _capture(device)
        if self._state is not None:
            _restore(self._state, device)

    def exit(self, device: torch.device) -> None:
        """End a step: keep the stream's new state and give the global generator its state back."""
        if self._outside is None:
            return
        self._state = _capture(device)
        _restore(self._outside, device)
        self._outside = None

    def state_dict(self, device: torch.device) -> dict[str, Any]:
        """The stream's state (empty before the first step); taken mid-step, the state the step reached."""
        state = _capture(device) if self.active else self._state
        return {} if state is None else {k: v.clone() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream from ``state`` at the next step (an empty dict: start from the global state)."""
        if state and "cpu" not in state:
            raise ValueError(f"not a training RNG state (keys {sorted(state)}); expected a 'cpu' generator state")
        self._state = dict(state) if state else None
