"""Train molex models with ``transformers.Trainer`` or TRL's ``SFTTrainer`` (``pip install 'molex-lora[hf]'``).

    model = molex.inject(base, molex.MoLEConfig(num_experts=4, rank=8, target_modules=["q_proj", "v_proj"]))
    trainer = MoLETrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                          data_collator=MoLEDataCollator(pad_token_id=tok.pad_token_id))
    trainer.train()

:class:`MoLETrainerMixin` adds the routers' auxiliary losses (:func:`molex.total_aux_loss`) to the
loss of every step, writes checkpoints holding only the adapter in :func:`molex.save_adapter`'s
crash-safe format (optimizer, scheduler and RNG states beside it, as ``Trainer`` does, so
``train(resume_from_checkpoint=...)`` works) and adds routing health to every training log record,
so to all of the Trainer's loggers.
:class:`MoLETrainer` is ``Trainer`` with it; :func:`sft_trainer_class` gives TRL's ``SFTTrainer`` with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

import molex
from molex.data.collate import pad_collate
from molex.layer.io import WEIGHTS_NAME, _load_strict, _read_weights

__all__ = ["MoLEDataCollator", "MoLETrainer", "MoLETrainerMixin", "routing_health_logs", "sft_trainer_class"]


class MoLEDataCollator:
    """Pads examples ``{input_ids, labels?, prompt_mask?, task_id?, feature_ids?}`` into a batch with the
    routing inputs molex reads: ``input_ids``, ``attention_mask``, ``labels`` ``[B, S]``, ``prompt_mask``
    ``[B, S]``, ``task_ids [B]`` (when every example has ``task_id``) and ``features {name: [B]}``.

    ``labels`` default to ``input_ids`` and ``prompt_mask`` to zeros when an example has none; that is
    what a tokenised text data set (TRL's) holds.
    """

    def __init__(self, *, pad_token_id: int, feature_names: Sequence[str] = (), pad_to_multiple_of: int | None = None):
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id!r}; set tokenizer.pad_token")
        self.pad_token_id = pad_token_id
        self.feature_names = tuple(feature_names)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        rows = []
        for example in examples:
            if "input_ids" not in example:
                raise ValueError(f"an example has no input_ids (keys: {sorted(example)}); tokenise the data first")
            ids = list(example["input_ids"])
            row = {
                **example,
                "input_ids": ids,
                "labels": list(example.get("labels", ids)),
                "prompt_mask": list(example.get("prompt_mask", [0] * len(ids))),
            }
            rows.append(row)
        return pad_collate(
            rows,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            feature_names=self.feature_names,
        )


def routing_health_logs(model: nn.Module) -> dict[str, float]:
    """``{routing/<layer>/largest_share, dead_experts, entropy}`` since the last read (empty before a forward)."""
    try:
        health = molex.routing_health(model)
    except ValueError:  # no forward since the last read
        return {}
    logs: dict[str, float] = {}
    for name, layer in health.layers.items():
        logs[f"routing/{name}/largest_share"] = float(layer.largest_share)
        logs[f"routing/{name}/dead_experts"] = float(layer.dead_experts)
        if layer.entropy is not None:
            logs[f"routing/{name}/entropy"] = float(layer.entropy)
    return logs


class MoLETrainerMixin:
    """Put before a ``Trainer`` class: ``class T(MoLETrainerMixin, Trainer)``. Needs a model with MoLE layers."""

    def __init__(self, *args: Any, routing_health: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not molex.mole_layers(self.model):
            raise ValueError("the model has no MoLE layers: call molex.inject (or molex.fuse_adapters) first")
        self.logs_routing_health = routing_health
        if routing_health:
            molex.enable_routing_health(self.model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # before Trainer.log hands the record to every logger (report_to) and the history
        if self.logs_routing_health and "loss" in logs:
            logs = {**logs, **routing_health_logs(self.accelerator.unwrap_model(self.model))}
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the routers' losses are those of the forward inside compute_loss (the last one)
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        aux = molex.total_aux_loss(model)
        if aux is not None:
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # adapter only, in molex's crash-safe format; the base model is whatever the run started from
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        molex.save_adapter(self.accelerator.unwrap_model(self.model), directory)
        torch.save(self.args, directory / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        directory = Path(resume_from_checkpoint)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(
                f"{directory} holds no molex adapter ({WEIGHTS_NAME}): resume from a checkpoint this trainer wrote"
            )
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        _load_strict(target, _read_weights(weights), directory)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class MoLETrainer(MoLETrainerMixin, Trainer):
    """``transformers.Trainer`` for molex models (see :class:`MoLETrainerMixin`)."""


def sft_trainer_class() -> type:
    """TRL's ``SFTTrainer`` with :class:`MoLETrainerMixin` (imported here: TRL is optional)."""
    try:
        from trl import SFTTrainer
    except ImportError as err:
        raise ImportError("TRL is not installed: pip install 'molex-lora[hf]'") from err
    return type("MoLESFTTrainer", (MoLETrainerMixin, SFTTrainer), {"__module__": __name__})
