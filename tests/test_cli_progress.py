"""``molex-train`` progress: steps out of ``max_steps`` on a terminal, plain lines in a log file."""

from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from molex.cli.common import CLIError
from molex.cli.progress import LineProgress, StepProgressBar, progress_callbacks


class _Tiny(L.LightningModule):
    """One linear layer on random data: 4 batches per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.layer(x).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=2)


def fit(callbacks, *, max_steps: int = 6, max_epochs: int = -1, accumulate: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        enable_progress_bar=any(isinstance(c, StepProgressBar) for c in callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(_Tiny())
    return trainer


def test_line_progress_prints_steps_out_of_max_steps_across_epochs():
    out = io.StringIO()
    fit([LineProgress(every_n_steps=2, stream=out)], max_steps=6)  # 4 batches per epoch: 2 epochs
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[:2] for line in lines] == [
        ["step 2/6", "epoch 0"],
        ["step 4/6", "epoch 0"],
        ["step 6/6", "epoch 1"],
    ]
    assert all(" loss " in f" {line} " and line.split("  ")[3].endswith("steps/s") for line in lines)
    assert lines[0].endswith("s left") and not lines[-1].endswith("s left") and "\r" not in out.getvalue()


def test_line_progress_counts_optimizer_steps_and_prints_the_last_one():
    out = io.StringIO()
    fit([LineProgress(every_n_steps=2, stream=out)], max_steps=3, accumulate=2)  # 2 batches per step
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == ["step 2/3", "step 3/3"]


def test_line_progress_without_max_steps_counts_steps_alone():
    out = io.StringIO()
    fit([LineProgress(every_n_steps=4, stream=out)], max_steps=-1, max_epochs=2)
    assert [line.split("  ")[:2] for line in out.getvalue().splitlines()] == [
        ["step 4", "epoch 0"],
        ["step 8", "epoch 1"],
    ]


def test_step_bar_counts_steps_against_max_steps(capsys):
    bar = StepProgressBar()
    fit([bar], max_steps=6)
    assert bar.train_progress_bar.total == 6 and bar.train_progress_bar.n == 6
    assert bar.train_progress_bar.desc.startswith("Epoch 1")
    printed = capsys.readouterr().out
    assert "6/6" in printed and "/-2" not in printed and "/4 " not in printed


def test_progress_callbacks_follow_the_trainer_config():
    trainer = OmegaConf.create({"enable_progress_bar": True, "log_every_n_steps": 7})
    (bar,) = progress_callbacks(trainer, interactive=True)
    assert isinstance(bar, StepProgressBar)
    (lines,) = progress_callbacks(trainer, interactive=False)
    assert isinstance(lines, LineProgress) and lines.every_n_steps == 7
    assert progress_callbacks(OmegaConf.create({"enable_progress_bar": False}), interactive=False) == []
    with pytest.raises(CLIError, match=r"trainer.log_every_n_steps=0: .*positive"):
        progress_callbacks(OmegaConf.create({"log_every_n_steps": 0}), interactive=False)


class _WithLMLoss(_Tiny):
    """Logs a total loss and, apart, an LM loss of exactly 0.25."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/lm_loss", torch.tensor(0.25))
        return loss + 1.0


def test_line_progress_headlines_the_lm_loss_when_logged():
    out = io.StringIO()
    trainer = L.Trainer(
        max_steps=2, callbacks=[LineProgress(every_n_steps=1, stream=out)], enable_progress_bar=False,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_WithLMLoss())
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all("loss 0.2500" in line for line in lines), lines
