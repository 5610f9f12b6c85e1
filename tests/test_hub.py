"""fuse_adapters: exactness against PEFT, mixed ranks/targets, save/load, bad adapters, router training."""

from __future__ import annotations

import json

import pytest
import torch

import molex
from molex.hub import adapter_gates, expert_slots
from tests.helpers.hub import make_peft_adapter, one_thread  # noqa: F401 - one_thread is a fixture
from tests.helpers.models import tiny_gpt2, tiny_llama

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


@pytest.mark.parametrize("router", ["topk", "fixed"])
def test_one_adapter_top1_equals_peft(tmp_path, router):
    peft_model = make_peft_adapter(tiny_llama, tmp_path / "a", seed=3, use_rslora=True, r=6, lora_alpha=5)
    options = {"top_k": 1} if router == "topk" else {"weights": [1.0]}
    fused = molex.fuse_adapters(tiny_llama(), {"a": tmp_path / "a"}, router=router, **options)
    torch.testing.assert_close(logits(fused), logits(peft_model), atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for layer in molex.mole_layers(fused).values() for p in layer.experts.parameters())


def test_regex_targets_and_rank_pattern_equal_peft(tmp_path):
    peft_model = make_peft_adapter(
        tiny_llama,
        tmp_path / "re",
        seed=9,
        target_modules=r".*\.(q_proj|down_proj)",
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 7},
    )
    fused = molex.fuse_adapters(tiny_llama(), {"re": tmp_path / "re"}, router="fixed", weights=[1.0])
    assert len(molex.mole_layers(fused)) == 8
    torch.testing.assert_close(logits(fused), logits(peft_model), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out_equals_peft(tmp_path):
    peft_model = make_peft_adapter(
        tiny_gpt2, tmp_path / "g", seed=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    fused = molex.fuse_adapters(tiny_gpt2(), {"g": tmp_path / "g"}, router="topk", top_k=1)
    assert len(molex.mole_layers(fused)) == 4
    torch.testing.assert_close(logits(fused), logits(peft_model), atol=1e-5, rtol=1e-5)


def two_adapters_on(tmp_path, num_layers=4):
    """Different ranks, alphas and targets (q/v vs q/k/o) and a .bin file."""
    factory = lambda: tiny_llama(num_layers=num_layers)
    make_peft_adapter(factory, tmp_path / "a", seed=5, r=4, lora_alpha=8)
    make_peft_adapter(
        factory, tmp_path / "b", seed=6, r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"], safe=False
    )
    return {"a": tmp_path / "a", "b": tmp_path / "b"}


def two_adapters(tmp_path):
    return two_adapters_on(tmp_path)


def test_fixed_weights_equal_peft_cat(tmp_path):
    from peft import PeftModel

    adapters = two_adapters(tmp_path)
    weights = [0.7, -0.4]
    reference = PeftModel.from_pretrained(tiny_llama(), str(adapters["a"]), adapter_name="a")
    reference.load_adapter(str(adapters["b"]), adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], weights, adapter_name="cat", combination_type="cat")
    reference.set_adapter("cat")
    fused = molex.fuse_adapters(tiny_llama(), adapters, router="fixed", weights=weights)
    slots = expert_slots(fused)
    assert slots["model.layers.0.self_attn.q_proj"] == [0, 1]
    assert slots["model.layers.0.self_attn.v_proj"] == [0]
    assert slots["model.layers.0.self_attn.k_proj"] == [1]
    torch.testing.assert_close(logits(fused), logits(reference.eval()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("router", "options"), [("soft", {"temperature": 0.5}), ("dlp", {"top_p": 0.9})])
def test_fused_model_round_trips_save_load(tmp_path, router, options):
    adapters = two_adapters(tmp_path)
    fused = molex.fuse_adapters(tiny_llama(), adapters, router=router, **options)
    torch.manual_seed(0)
    for name, param in fused.named_parameters():
        if "router" in name:
            torch.nn.init.normal_(param)
    molex.save_adapter(fused, tmp_path / "saved")
    loaded = molex.load_adapter(tiny_llama(), tmp_path / "saved")
    assert molex.adapter_names(loaded) == ["a", "b"]
    assert expert_slots(loaded) == expert_slots(fused)
    torch.testing.assert_close(logits(loaded), logits(fused))


def test_only_router_trains_and_gates_map_to_adapters(tmp_path):
    fused = molex.fuse_adapters(tiny_llama(), two_adapters(tmp_path), router="soft")
    trainable = {n for n, p in fused.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    logits(fused)
    gates = adapter_gates(fused)
    torch.testing.assert_close(gates["model.layers.0.self_attn.v_proj"][:, 1], torch.zeros(IDS.numel()))
    torch.testing.assert_close(gates["model.layers.0.self_attn.q_proj"].sum(-1), torch.ones(IDS.numel()))
    unfrozen = molex.fuse_adapters(tiny_llama(), two_adapters(tmp_path), router="soft", train_experts=True)
    assert all(p.requires_grad for layer in molex.mole_layers(unfrozen).values() for p in layer.experts.parameters())
    with pytest.raises(ValueError, match=r"top_k=2 but .* fewer adapters"):
        molex.fuse_adapters(tiny_llama(), two_adapters(tmp_path), router="topk", top_k=2)


def wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def corrupt(tmp_path, kind):
    path = tmp_path / kind
    make_peft_adapter(tiny_llama, path, seed=7)
    weights = path / "adapter_model.safetensors"
    config = json.loads((path / "adapter_config.json").read_text())
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif kind == "no_weights":
        weights.unlink()
    elif kind == "bad_json":
        (path / "adapter_config.json").write_text("{not json")
    elif kind == "unknown_target":
        config["target_modules"] = ["q_proj", "qq_proj"]
    elif kind == "dora":
        config["use_dora"] = True
    elif kind == "wrong_rank":
        config["r"] = 3
    elif kind == "other_model":
        make_peft_adapter(wider_llama, path, seed=7)
    elif kind == "pickle":
        weights.unlink()
        torch.save({"x": object()}, path / "adapter_model.bin")
    if kind in ("unknown_target", "dora", "wrong_rank"):
        (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", r"adapter 'truncated'.*corrupt"),
        ("no_weights", r"adapter 'no_weights': no adapter_model.safetensors or adapter_model.bin"),
        ("bad_json", r"adapter 'bad_json'.*not valid JSON"),
        ("unknown_target", r"adapter 'unknown_target'.*target module 'qq_proj' matches no module.*q_proj"),
        ("dora", r"adapter 'dora'.*DoRA"),
        ("wrong_rank", r"adapter 'wrong_rank'.*rank 4 but the config says r=3"),
        ("other_model", r"adapter 'other_model'.*module 'model.layers.0.self_attn.q_proj'.*different dimensions"),
        ("pickle", r"adapter 'pickle'.*plain tensors"),
    ],
)
def test_bad_adapters_refused_before_model_changes(tmp_path, kind, message):
    good = make_peft_adapter(tiny_llama, tmp_path / "good", seed=8)
    del good
    model = tiny_llama()
    before = logits(model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        molex.fuse_adapters(model, {"good": tmp_path / "good", kind: corrupt(tmp_path, kind)}, router="soft")
    assert not molex.mole_layers(model)
    torch.testing.assert_close(logits(model), before)


def task_batches(num_tasks, per_task, seed):
    """Task t's prompts draw tokens from its own band of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(per_task):
        tasks = torch.arange(num_tasks)
        ids = torch.stack([torch.randint(1 + 16 * t, 16 * (t + 1), (12,), generator=gen) for t in tasks.tolist()])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "task_ids": tasks})
    return batches


@pytest.mark.parametrize(("router", "options"), [("soft", {}), ("gate", {"top_k": 2}), ("dlp", {"top_p": 0.5})])
def test_train_router_learns_task_identity(tmp_path, router, options):
    adapters = {f"t{i}": tmp_path / f"t{i}" for i in range(3)}
    for i, path in enumerate(adapters.values()):
        make_peft_adapter(lambda: tiny_llama(num_layers=2), path, seed=10 + i)
    fused = molex.fuse_adapters(tiny_llama(num_layers=2), adapters, router=router, **options)
    train, held_out = task_batches(3, 8, seed=0), task_batches(3, 10, seed=1)
    history = molex.train_router(fused, train, steps=60, lr=0.03, task_loss_coef=1.0)
    assert history[-1] < history[0]
    accuracy = molex.routing_accuracy(fused, held_out)
    assert accuracy >= 0.95


def test_dlp_chooses_among_adapters_globally(tmp_path):
    """dlp decides once per sequence over adapters; a module an adapter does not target holds a zero expert."""
    from peft import PeftModel

    adapters = two_adapters(tmp_path)
    fused = molex.fuse_adapters(tiny_llama(), adapters, router="dlp", top_p=0.5)
    assert expert_slots(fused)["model.layers.0.self_attn.k_proj"] == [0, 1]  # "a" does not target k_proj
    classifier = fused.mole_router.classifier
    with torch.no_grad():  # always adapter "b"
        classifier[-1].weight.zero_()
        classifier[-1].bias.copy_(torch.tensor([-20.0, 20.0]))
    reference = PeftModel.from_pretrained(tiny_llama(), str(adapters["b"])).eval()
    torch.testing.assert_close(logits(fused), logits(reference), atol=1e-5, rtol=1e-5)
    gates = adapter_gates(fused)
    torch.testing.assert_close(gates["model.layers.0.self_attn.v_proj"][:, 1], torch.ones(IDS.numel()))


def test_router_task_loss_needs_aligned_experts(tmp_path):
    with pytest.raises(ValueError, match="task_loss_coef reads task_ids as expert indices"):
        molex.fuse_adapters(tiny_llama(), two_adapters(tmp_path), router="gate", top_k=1, task_loss_coef=1.0)
    with pytest.raises(ValueError, match="chooses among the modules of a decoder block"):
        molex.fuse_adapters(tiny_llama(), two_adapters(tmp_path), router="milora")


def test_train_router_needs_trainable_params_and_task_ids(tmp_path):
    make_peft_adapter(tiny_llama, tmp_path / "a", seed=1)
    fixed = molex.fuse_adapters(tiny_llama(), {"a": tmp_path / "a"}, router="fixed")
    with pytest.raises(ValueError, match="no trainable parameters"):
        molex.train_router(fixed, [{"input_ids": IDS}], steps=1)
    soft = molex.fuse_adapters(tiny_llama(), {"a": tmp_path / "a"}, router="soft")
    with pytest.raises(ValueError, match="needs `task_ids`"):
        molex.train_router(soft, [{"input_ids": IDS}], steps=1, task_loss_coef=1.0)


def test_lightning_module_trains_only_the_fused_router(tmp_path):
    L = pytest.importorskip("lightning")
    lightning_module = pytest.importorskip("molex.lightning")
    fused = molex.fuse_adapters(tiny_llama(num_layers=2), two_adapters_on(tmp_path, num_layers=2), router="soft")
    before = {k: v.clone() for k, v in molex.adapter_state_dict(fused).items()}
    module = lightning_module.MoLEModule(model=fused, learning_rate=1e-2)
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}] * 3
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    after = molex.adapter_state_dict(fused)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".router." in k for k in changed)
