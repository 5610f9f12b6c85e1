"""merge_route: one route merged into a plain transformers model; save_pretrained / from_pretrained round trip."""

from __future__ import annotations

import json

import pytest
import torch

import molex
from molex.export import RoutePrompts, save_merged
from tests.helpers.hub import one_thread  # noqa: F401 - fixture
from tests.helpers.models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [4, 8, 15, 16, 23, 42]


def dlp_model():
    model = tiny_llama()
    cfg = molex.MoLEConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        num_experts=3,
        rank=2,
        router="dlp",
        router_options={"top_p": 1.0, "classifier_hidden": 8, "dropout": 0.0},
        allocation=molex.AllocationConfig(rank_overrides={r"down_proj": 4}),
    )
    molex.inject(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.3)
        for p in model.mole_router.parameters():
            p.normal_()
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_merged_prompt_route_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = dlp_model()
    expected = logits(model)
    merged = molex.merge_route(model, RoutePrompts(token_ids=[IDS]))
    assert not any(isinstance(m, (molex.MoLELinear, molex.routers.Router)) for m in merged.modules())
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (logits(merged) - expected).abs().max() <= 1e-5
    assert torch.equal(logits(model), expected)  # the molex model is left as it was
    folder = save_merged(merged, tmp_path / "merged", info={"route": "demo"})
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert torch.equal(logits(reloaded), logits(merged))
    assert json.loads((folder / "molex_merged.json").read_text())["route"] == "demo"
    save_merged(merged, folder)  # replaces its own save
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        save_merged(merged, tmp_path / "other")


def test_merged_weights_on_gpt2_conv1d():
    model = tiny_gpt2()
    molex.inject(
        model,
        molex.MoLEConfig(
            target_modules=["c_attn", "c_fc"],
            num_experts=2,
            rank=2,
            router="fixed",
            router_options={"weights": [0.3, 0.9]},
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.3)
    merged = molex.merge_route(model)  # the fixed router's mixture
    assert (logits(merged) - logits(model)).abs().max() <= 1e-5


def test_explicit_weights_and_several_decisions():
    model = dlp_model()
    merged = molex.merge_route(model, [0.0, 1.0, 0.0])
    reference = tiny_llama()
    # expert 1 alone, added by hand
    with torch.no_grad():
        for name, layer in molex.mole_layers(model).items():
            e = layer.experts
            reference.get_submodule(name).weight += e.scaling[1] * e.lora_B[1].t() @ e.lora_A[1]
    assert (logits(merged) - logits(reference)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="different decisions"):
        molex.merge_route(model, RoutePrompts(token_ids=[IDS, [9, 9, 100, 3]]))
