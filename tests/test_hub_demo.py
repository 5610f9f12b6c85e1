"""The demo hub on the tiny model: one PEFT adapter per built-in task, routers learn task identity."""

from __future__ import annotations

import pytest
import torch

import molex
from tests.helpers.hub import one_thread  # noqa: F401 - fixture

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from benchmarks.demo_hub import FAST, HubSettings, load_model, train_adapters

    settings = HubSettings(**{**FAST, "adapter_steps": 5, "evaluate": False, "test_per_task": 12})
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_model(settings.model)
        singles = train_adapters(model, tokenizer, settings, tmp_path_factory.mktemp("hub"))
    finally:
        torch.set_num_threads(previous)
    return settings, model, tokenizer, {task: info["path"] for task, info in singles.items()}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("router", ["gate", "dlp"])
def test_router_learns_task_identity_on_held_out_prompts(hub, router):
    from benchmarks.demo_hub import fuse_and_evaluate

    settings, model, tokenizer, adapters = hub
    result = fuse_and_evaluate(model, tokenizer, adapters, router, settings)
    assert result["routing_accuracy"] >= 0.95
    assert not molex.mole_layers(model)  # the base model is restored


@pytest.mark.usefixtures("one_thread")
def test_a_training_free_router_writes_strict_json(hub):
    import json

    from benchmarks.demo_hub import fuse_and_evaluate, table

    settings, model, tokenizer, adapters = hub
    result = fuse_and_evaluate(model, tokenizer, adapters, "arrow", settings)
    assert result["router_loss"] is None  # nothing was trained: no loss, and no NaN in results.json
    singles = {task: {"accuracy": None} for task in adapters}  # the fixture's adapters were not evaluated
    text = json.dumps({"fused": [result], "singles": singles, "table": table(singles, [result])}, allow_nan=False)
    assert "| **mean** | - |" in json.loads(text)["table"]
