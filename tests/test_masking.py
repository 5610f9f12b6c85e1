"""``molex.mask_experts``: masked experts get no weight, the rest renormalise, unmasking is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import molex
from tests.helpers.models import tiny_llama as shared_tiny_llama


def tiny_llama(num_layers: int = 2, seed: int = 0):
    """The tiny random llama of the test suite (built from a config, no download)."""
    return shared_tiny_llama(num_layers=num_layers, seed=seed)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("hub")
    adapters = {}
    for i, name in enumerate(["math", "code", "chat"]):
        model = tiny_llama()
        torch.manual_seed(20 + i)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(str(root / name))
        adapters[name] = str(root / name)
    return adapters


IDS = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("router", "options"), [("gate", {"top_k": 2}), ("arrow", {"top_k": 2}), ("dlp", {})])
def test_masked_expert_gets_zero_weight_and_unmask_is_exact(hub, router, options):
    model = molex.fuse_adapters(tiny_llama(), hub, router=router, **options).eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        dense_before = {n: layer.last_decision.to_dense(3) for n, layer in molex.mole_layers(model).items()}
        with molex.masked_experts(model, ["code"]):
            masked = model(input_ids=IDS).logits
            for name, layer in molex.mole_layers(model).items():
                dense = layer.last_decision.to_dense(3)
                assert torch.all(dense[:, 1] == 0), name
                torch.testing.assert_close(dense.sum(-1), dense_before[name].sum(-1))
        after = model(input_ids=IDS).logits
    assert not torch.equal(masked, before)
    assert torch.equal(after, before)


def test_token_level_masks_before_top_k(hub):
    """With top_k=1, a token whose first choice is masked gets its second choice at full weight."""
    model = molex.fuse_adapters(tiny_llama(), hub, router="gate", top_k=1).eval()
    layer = next(iter(molex.mole_layers(model).values()))
    with torch.no_grad():
        model(input_ids=IDS)
        probs = layer.last_decision.probs
        molex.mask_experts(model, [0])
        model(input_ids=IDS)
    decision = layer.last_decision
    expected = probs[:, 1:].argmax(-1) + 1
    assert torch.equal(decision.indices[:, 0], expected)
    assert torch.allclose(decision.weights, torch.ones_like(decision.weights))


def test_bad_masks_fail_clearly(hub):
    model = molex.fuse_adapters(tiny_llama(), hub, router="gate", top_k=2)
    with pytest.raises(ValueError, match="'poetry': not a fused adapter"):
        molex.mask_experts(model, ["poetry"])
    with pytest.raises(ValueError, match="cannot mask expert 7"):
        molex.mask_experts(model, [7])
    with pytest.raises(ValueError, match="leaves layer"):
        molex.mask_experts(model, ["math", "code", "chat"])


def test_fuse_cli_arrow_with_mask(tmp_path):
    from hydra import compose, initialize_config_dir
    from peft import LoraConfig, get_peft_model

    from molex.cli.fuse import fuse
    from molex.models import load_model

    for seed, task in enumerate(["add", "parity"]):
        model, _ = load_model("tiny-llama")
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(str(tmp_path / "hub" / task))
    conf = str(Path(molex.__file__).resolve().parent / "conf")
    overrides = [
        f"adapters={tmp_path / 'hub'}",
        "model.name_or_path=tiny-llama",
        "router=arrow",
        "mask=[parity]",
        "data.num_per_task=2",
        "data.eval_per_task=2",
        "eval.max_new_tokens=2",
        f"output_dir={tmp_path / 'out'}",
    ]
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="fuse", overrides=overrides)
    results = fuse(cfg)
    assert results["mask"] == ["parity"]
    # every sequence is routed to "add" alone: half the labels (those of "parity") are missed
    assert results["fused"]["routing_accuracy"] == pytest.approx(0.5)


def test_readme_example_runs(hub, tmp_path, monkeypatch):
    import shutil

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Fusing LoRA hubs\n", 1)[1].split("\n## ", 1)[0]
    block = next(b.split("```", 1)[0] for b in section.split("```python\n")[1:] if "masked_experts" in b)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub["chat"], tmp_path / "adapters" / "general")
    readme_hub = {"add": hub["math"], "capital": hub["code"], "parity": hub["chat"]}
    namespace = {"molex": molex, "model": tiny_llama(), "hub": readme_hub, "batch": {"input_ids": IDS}}
    exec(block, namespace)
    assert namespace["logits"].shape == (2, 6, 128)
