"""export_routes: per-sequence routes as plain PEFT adapters, equal to the routed model (fp32, <= 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

import molex
from molex.export import RoutePrompts
from tests.helpers.hub import make_peft_adapter, one_thread  # noqa: F401 - fixture
from tests.helpers.models import tiny_llama

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 5, 9, 13, 2], [7, 7, 40, 3], [100, 2, 3, 4, 5, 6], [11, 90, 64], [3, 3, 3, 30, 31, 32, 33]]


def randomise(model, seed: int = 0) -> None:
    """Non-zero B's and random router weights, so routes differ between prompts."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.2)
        for module in model.modules():
            if isinstance(module, molex.routers.Router):
                for p in module.parameters():
                    p.normal_(std=1.0)


def molex_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def peft_logits(adapter, ids):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(adapter)).eval()
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor([ids])).logits


def check_exact(model, exported):
    routes = exported.index["routes"]
    assert routes
    for name, entry in routes.items():
        for ids in entry["prompts"]:
            diff = (peft_logits(exported.adapters[name], ids) - molex_logits(model, ids)).abs().max().item()
            assert diff <= 1e-5, (name, diff)


def adapter_ranks(folder):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[0]
        for k, v in tensors.items()
        if k.endswith("lora_A.weight")
    }


def test_dlp_routes_exact_with_mixed_ranks(tmp_path):
    model = tiny_llama()
    cfg = molex.MoLEConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        num_experts=3,
        rank=4,
        router="dlp",
        router_options={"top_p": 0.9, "classifier_hidden": 8, "dropout": 0.0},
        allocation=molex.AllocationConfig(rank_overrides={r"layers\.0\.": 2, r"down_proj": 6}),
    )
    molex.inject(model, cfg)
    randomise(model)
    exported = molex.export_routes(
        model, tmp_path / "out", {"a": RoutePrompts(token_ids=PROMPTS[:3]), "b": RoutePrompts(token_ids=PROMPTS[3:])}
    )
    check_exact(model, exported)
    index = json.loads((tmp_path / "out" / "routes.json").read_text())
    assert index["format"] == "molex-routes" and index["router"] == "dlp"
    assert sum(len(e["prompts"]) for e in index["routes"].values()) == len(PROMPTS)
    assert set(index["by_name"]) == {"a", "b"}
    config = json.loads((exported.path / next(iter(index["routes"])) / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # layers of other ranks are named


def test_milora_routes_exact_with_per_layer_experts(tmp_path):
    model = tiny_llama()
    cfg = molex.MoLEConfig(
        target_modules=["q_proj", "v_proj", "up_proj"],
        num_experts=2,
        rank=3,
        router="milora",
        router_options={"top_k": 2},
        allocation=molex.AllocationConfig(per_layer=[1, 2, 3, 2], rank_overrides={r"up_proj": 5}),
    )
    molex.inject(model, cfg)
    randomise(model, seed=1)
    exported = molex.export_routes(model, tmp_path / "out", RoutePrompts(token_ids=PROMPTS))
    check_exact(model, exported)
    # milora switches a block's modules on or off: a route leaves one module of each block out
    for entry in exported.index["routes"].values():
        assert len(entry["rank"]) == 2 * 4


def test_fixed_route_of_a_fused_hub_with_mixed_ranks(tmp_path):
    hub = {}
    for seed, rank in enumerate([2, 4]):
        make_peft_adapter(tiny_llama, tmp_path / f"a{seed}", seed=seed, r=rank, lora_alpha=2 * rank)
        hub[f"a{seed}"] = tmp_path / f"a{seed}"
    model = molex.fuse_adapters(tiny_llama(), hub, router="fixed", weights=[0.7, -0.4])
    exported = molex.export_routes(model, tmp_path / "out")  # routes=None: the fixed router's one route
    (name,) = exported.index["routes"]
    assert set(adapter_ranks(exported.adapters[name]).values()) == {6}
    diff = (peft_logits(exported.adapters[name], PROMPTS[0]) - molex_logits(model, PROMPTS[0])).abs().max()
    assert diff <= 1e-5
    # one adapter alone: its own rank (the fused pool's zero padding is dropped) and PEFT's own output
    molex.set_adapter_weights(model, [1.0, 0.0])
    single = molex.export_routes(model, tmp_path / "single")
    folder = next(iter(single.adapters.values()))
    assert set(adapter_ranks(folder).values()) == {2}
    reference = make_peft_adapter(tiny_llama, tmp_path / "again", seed=0, r=2, lora_alpha=4)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPTS[1]])).logits
    assert (peft_logits(folder, PROMPTS[1]) - expected).abs().max() <= 1e-5


def test_single_expert_route_has_that_experts_rank(tmp_path):
    model = tiny_llama()
    cfg = molex.MoLEConfig(
        target_modules=["q_proj", "v_proj"],
        num_experts=3,
        rank=4,
        router="dlp",
        router_options={"top_p": 1e-6, "classifier_hidden": 8, "dropout": 0.0},  # top-1: one expert per prompt
        allocation=molex.AllocationConfig(rank_overrides={r"v_proj": 2}),
    )
    molex.inject(model, cfg)
    randomise(model, seed=2)
    exported = molex.export_routes(model, tmp_path / "out", {"p": RoutePrompts(token_ids=PROMPTS)})
    for name, entry in exported.index["routes"].items():
        ranks = adapter_ranks(exported.adapters[name])
        assert all(r == (2 if layer.endswith("v_proj") else 4) for layer, r in ranks.items())
        assert all(len(d["experts"]) == 1 and d["weights"] == [1.0] for d in entry["decision"].values())
    check_exact(model, exported)


def test_explicit_weights_drop_zero_experts(tmp_path):
    model = tiny_llama()
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=3, rank=2, router="topk", top_k=2))
    randomise(model)
    exported = molex.export_routes(model, tmp_path / "out", {"mix": [0.5, 0.0, 2.0], "one": [0, 1, 0]})
    assert set(adapter_ranks(exported.adapters["mix"]).values()) == {4}
    assert set(adapter_ranks(exported.adapters["one"]).values()) == {2}
    assert exported.index["by_name"] == {"mix": ["mix"], "one": ["one"]}


@pytest.mark.parametrize("router", ["topk", "soft", "switch", "dynmole", "gate"])
def test_token_level_router_is_refused_with_the_way_out(tmp_path, router):
    model = tiny_llama(num_layers=2)
    top_k = {"topk": 2}.get(router)
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=3, rank=2, router=router, top_k=top_k))
    with pytest.raises(ValueError, match="export_single.*approximat"):
        molex.export_routes(model, tmp_path / "out", {"p": RoutePrompts(token_ids=PROMPTS[:1])})
    assert not (tmp_path / "out").exists()


def test_bad_routes_and_foreign_folders(tmp_path):
    model = tiny_llama(num_layers=2)
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=2, rank=2, router="dlp"))
    randomise(model)
    with pytest.raises(ValueError, match="fixed"):
        molex.export_routes(model, tmp_path / "out")  # routes=None needs the fixed router
    with pytest.raises(ValueError, match="2 experts"):
        molex.export_routes(model, tmp_path / "out", {"w": [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="tokenizer="):
        molex.export_routes(model, tmp_path / "out", ["a prompt"])
    foreign = tmp_path / "foreign"
    (foreign / "w").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="did not write"):
        molex.export_routes(model, foreign, {"w": [1.0, 0.0]})
    out = molex.export_routes(model, tmp_path / "again", {"w": [1.0, 0.0]})
    molex.export_routes(model, tmp_path / "again", {"v": [0.0, 1.0]})  # replaces its own export
    assert sorted(p.name for p in out.path.iterdir()) == ["routes.json", "v"]


def test_mtl_routes_by_task_are_exact(tmp_path):
    model = tiny_llama()  # the base peft_logits loads
    molex.inject(
        model,
        molex.MoLEConfig(
            target_modules=["q_proj", "v_proj"], num_experts=3, rank=2, router="mtl", router_options={"num_tasks": 2}
        ),
    )
    randomise(model, seed=4)
    routes = {f"task{t}": RoutePrompts(token_ids=PROMPTS[:2], task_ids=t) for t in range(2)}
    exported = molex.export_routes(model, tmp_path / "out", routes)
    assert exported.index["by_name"] == {"task0": ["task0"], "task1": ["task1"]}  # one decision per task
    for t in range(2):
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([PROMPTS[0]]), task_ids=torch.tensor([t])).logits
        assert (peft_logits(exported.adapters[f"task{t}"], PROMPTS[0]) - expected).abs().max() <= 1e-5
