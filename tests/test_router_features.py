"""FLix (``features`` router): each feature value owns an expert; an example sums its features' experts.
Also the data path: ``columns={"features": [...]}`` read from files and carried in batches."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import molex
from molex.layer.context import RoutingContext
from molex.layer.experts import LoRAExperts
from molex.layer.linear import MoLELinear
from molex.routers import build_router
from tests.helpers.models import tiny_llama

FEATURES = {"task": 3, "lang": 2}  # experts 0-2: tasks, 3-4: languages


def features_layer(weights=None) -> MoLELinear:
    torch.manual_seed(0)
    pool = LoRAExperts(in_features=6, out_features=4, num_experts=5, rank=2, scaling=0.5).double()
    with torch.no_grad():
        pool.lora_B.normal_()
    router = build_router("features", in_features=6, num_experts=5, features=FEATURES, weights=weights)
    return MoLELinear(nn.Linear(6, 4).double(), experts=pool, router=router)


def run(layer: MoLELinear, x: torch.Tensor, **features) -> torch.Tensor:
    layer.context = RoutingContext(batch_size=x.shape[0], seq_len=x.shape[1])
    layer.context.inputs = {"features": features}
    return layer(x)


def expert(layer: MoLELinear, e: int, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x @ layer.experts.lora_A[e].t()) @ layer.experts.lora_B[e]


# (task, lang) pairs; say training saw (0, 0), (1, 1), (2, 0): (0, 1) and (2, 1) are new combinations
@pytest.mark.parametrize("pairs", [[(0, 0), (1, 1), (2, 0)], [(0, 1), (2, 1)]], ids=["seen", "unseen"])
def test_output_is_the_sum_of_the_selected_experts(pairs):
    layer = features_layer()
    x = torch.randn(len(pairs), 3, 6, dtype=torch.float64)
    tasks, langs = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    out = run(layer, x, task=tasks, lang=langs)
    expected = torch.stack(
        [layer.base_layer(x[b]) + expert(layer, t, x[b]) + expert(layer, 3 + g, x[b]) for b, (t, g) in enumerate(pairs)]
    )
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_feature_weights_and_per_token_ids():
    layer = features_layer(weights={"lang": 0.25})
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    langs = torch.tensor([[0, 1, 1, 0]])  # per token
    out = run(layer, x, task=torch.tensor([2]), lang=langs)
    expected = torch.stack(
        [
            layer.base_layer(x[0, s]) + expert(layer, 2, x[0, s]) + 0.25 * expert(layer, 3 + g, x[0, s])
            for s, g in enumerate(langs[0].tolist())
        ]
    )
    torch.testing.assert_close(out[0], expected, atol=1e-12, rtol=1e-12)


def test_missing_unknown_and_out_of_range_features_fail_clearly():
    layer = features_layer()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"missing the ids of feature\(s\) \['lang'\]"):
        run(layer, x, task=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\['langg'\].*does not know"):
        run(layer, x, task=torch.tensor([0, 1]), lang=torch.tensor([0, 1]), langg=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"feature 'lang' has 2 values .* got ids from 0 to 2"):
        run(layer, x, task=torch.tensor([0, 1]), lang=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="set num_experts=5"):
        build_router("features", in_features=6, num_experts=4, features=FEATURES)
    with pytest.raises(ValueError, match="needs features="):
        build_router("features", in_features=6, num_experts=4)


def test_inject_fixes_the_pool_size_and_task_falls_back_to_task_ids(caplog):
    model = tiny_llama(num_layers=2)
    config = molex.MoLEConfig(
        target_modules=["q_proj"],
        router="features",
        router_options={"features": {"task": 3}},
        allocation=molex.AllocationConfig(schedule="mola-increasing"),
    )
    with caplog.at_level(logging.WARNING, logger="molex.inject"):
        molex.inject(model, config)
    assert "fixes 3 experts per layer" in caplog.text
    assert all(layer.experts.num_experts == 3 for layer in molex.mole_layers(model).values())
    ids = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        a = model(input_ids=ids, task_ids=torch.tensor([0, 2])).logits
        b = model(input_ids=ids, features={"task": torch.tensor([0, 2])}).logits
    torch.testing.assert_close(a, b)


def test_feature_columns_are_read_and_batched(tmp_path):
    from molex.data.datamodule import InstructionDataModule
    from molex.models import load_model

    rows = [
        {"instruction": f"Say {i}", "output": f"y{i}", "task": "ab"[i % 2], "lang": ["de", "en", "fr"][i % 3]}
        for i in range(30)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_model("tiny-llama")[1]
    dm = InstructionDataModule(
        tokenizer=tokenizer, source=str(path), columns={"features": ["task", "lang"]}, batch_size=4, max_length=64
    )
    dm.setup()
    assert dm.feature_names == ["task", "lang"]
    assert dm.feature_values == {"task": ["a", "b"], "lang": ["de", "en", "fr"]}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["features"]) == {"task", "lang"} and batch["features"]["lang"].shape == (4,)
    examples = dm.examples("train")
    by_instruction = {r["instruction"]: r for r in rows}
    for example in examples:
        row = by_instruction[example["instruction"]]
        assert example["features"] == [row["task"], row["lang"]]
    packed = InstructionDataModule(
        tokenizer=tokenizer,
        source=str(path),
        columns={"features": ["task", "lang"]},
        batch_size=4,
        max_length=64,
        packing=True,
    )
    assert set(next(iter(packed.train_dataloader()))["features"]) == {"task", "lang"}
    with pytest.raises(ValueError, match="features \\(column 'dialect'\\)"):
        InstructionDataModule(tokenizer=tokenizer, source=str(path), columns={"features": ["dialect"]}).setup()
    with pytest.raises(ValueError, match="list of column names"):
        InstructionDataModule(tokenizer=tokenizer, source=str(path), columns={"features": "lang"})


def test_generation_evaluation_passes_the_feature_ids(tmp_path):
    from molex.data.datamodule import InstructionDataModule
    from molex.evaluation.generation import evaluate_generation
    from molex.models import load_model

    rows = [
        {"instruction": f"Say {i}", "output": f"y{i}", "task": "ab"[i % 2], "lang": "xyz"[i % 3]} for i in range(20)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = load_model("tiny-llama")
    dm = InstructionDataModule(tokenizer=tokenizer, source=str(path), columns={"features": ["task", "lang"]})
    values = dm.feature_values
    options = {"features": {name: len(v) for name, v in values.items()}}
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], router="features", router_options=options))
    examples = dm.test_examples()
    result = evaluate_generation(model, tokenizer, examples, max_new_tokens=2, feature_values=values)
    assert result["num_examples"] == len(examples)
    with pytest.raises(ValueError, match="missing the ids"):
        evaluate_generation(model, tokenizer, examples, max_new_tokens=2)
