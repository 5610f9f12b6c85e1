"""molex models under transformers.Trainer and TRL's SFTTrainer: aux loss, adapter checkpoints, resume."""

from __future__ import annotations

import pytest
import torch

import molex

pytest.importorskip("transformers")
from molex.integrations.hf import MoLEDataCollator, MoLETrainer, sft_trainer_class
from tests.helpers.models import tiny_llama as shared_tiny_llama


def tiny_llama(num_layers: int = 2, seed: int = 0):
    return shared_tiny_llama(num_layers=num_layers, seed=seed)


def mole_config() -> molex.MoLEConfig:
    # the default load_balance_coef (20 over the whole model) is sized for the 90 layers of the default recipe;
    # on 4 MoLE layers it is 5 per router and its noise would hide eight steps of LM progress in the logged loss
    return molex.MoLEConfig(
        num_experts=3,
        rank=4,
        target_modules=["q_proj", "v_proj"],
        router="topk",
        router_options={"top_k": 2, "load_balance_coef": 1.0},
    )


def mole_model():
    config = mole_config()
    return molex.inject(tiny_llama(), config)


def examples(n: int = 16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 16, (10,), generator=g).tolist()
        rows.append({"input_ids": ids, "prompt_mask": [1] * 3 + [0] * 7, "task_id": i % 3})
    return rows


def args(tmp_path, **overrides):
    from transformers import TrainingArguments

    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        max_steps=8,
        logging_steps=2,
        save_steps=4,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def router_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}


@pytest.mark.usefixtures("single_thread")
def test_trainer_trains_saves_resumes_and_loads(tmp_path):
    model = mole_model()
    before = router_weights(model)
    trainer = MoLETrainer(
        model=model, args=args(tmp_path), train_dataset=examples(), data_collator=MoLEDataCollator(pad_token_id=0)
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    assert any(key.startswith("routing/") for log in trainer.state.log_history for key in log)
    after = router_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # routers (and their aux loss) learn
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "adapter.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (checkpoint / "model.safetensors").exists()

    # an interrupted run resumes from the step-4 checkpoint and ends where the full run ended
    resumed = mole_model()
    trainer2 = MoLETrainer(
        model=resumed,
        args=args(tmp_path / "again"),
        train_dataset=examples(),
        data_collator=MoLEDataCollator(pad_token_id=0),
    )
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    assert trainer2.state.global_step == 8
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    trainer.save_model(str(tmp_path / "final"))
    loaded = molex.load_adapter(tiny_llama(), tmp_path / "final").eval()
    batch = MoLEDataCollator(pad_token_id=0)(examples(4))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, atol=0, rtol=0)


@pytest.mark.usefixtures("single_thread")
def test_sft_trainer_trains(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from molex.models import load_model

    base, tokenizer = load_model("tiny-llama")
    config = mole_config()
    model = molex.inject(base, config)
    before = router_weights(model)
    config = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        max_steps=8,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = sft_trainer_class()(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(examples()),
        processing_class=tokenizer,
        data_collator=MoLEDataCollator(pad_token_id=tokenizer.pad_token_id),
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in router_weights(model).items())


def test_aux_loss_is_in_the_training_loss(tmp_path):
    model = mole_model().train()
    trainer = MoLETrainer(
        model=model, args=args(tmp_path), train_dataset=examples(), data_collator=MoLEDataCollator(pad_token_id=0)
    )
    batch = MoLEDataCollator(pad_token_id=0)(examples(4))
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch))
    lm_loss = model(**batch).loss
    aux = molex.total_aux_loss(model)
    assert aux is not None and float(aux.detach()) > 0
    torch.testing.assert_close(loss, lm_loss + aux)


def readme_blocks(section: str) -> list[str]:
    """The ```python blocks of one README section."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


@pytest.mark.usefixtures("single_thread")
def test_readme_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset

    from molex.models import load_model

    trainer_block, sft_block = readme_blocks("Hugging Face Trainer and TRL")
    monkeypatch.chdir(tmp_path)
    exec(trainer_block, {"molex": molex, "model": tiny_llama(), "rows": examples()})
    assert (tmp_path / "out" / "checkpoint-8" / "adapter.safetensors").is_file()
    model, tokenizer = load_model("tiny-llama")
    namespace = {"molex": molex, "model": model, "tokenizer": tokenizer, "dataset": Dataset.from_list(examples())}
    # SFTConfig defaults to bf16 on an accelerator; this CPU-only run says so (the example's one change)
    exec(sft_block.replace("report_to=[]", "report_to=[], use_cpu=True", 1), namespace)
    assert molex.mole_layers(namespace["model"])
