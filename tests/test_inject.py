"""inject / unload on real transformers architectures built from tiny configs."""

import copy

import pytest
import torch

import molex
from tests.helpers.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2

FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "qwen2": (tiny_qwen2, ["q_proj", "k_proj", "up_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),  # GPT-2 Conv1D
    "bert": (tiny_bert, ["query", "value", "output.dense"]),
}


def inputs(batch=2, seq=7, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in the first row
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def random_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.copy_(torch.randn(layer.experts.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fresh_injection_and_unload_are_bit_identical(family):
    factory, targets = FAMILIES[family]
    model = factory()
    batch = inputs()
    with torch.no_grad():
        reference = outputs(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}

    cfg = molex.MoLEConfig(target_modules=targets, num_experts=3, top_k=2, rank=4)
    assert molex.inject(model, cfg) is model
    assert len(molex.mole_layers(model)) > 0
    with torch.no_grad():
        assert torch.equal(outputs(model, batch), reference)
        random_b(model)
        assert not torch.equal(outputs(model, batch), reference)

    molex.unload(model)
    assert not molex.mole_layers(model)
    with torch.no_grad():
        assert torch.equal(outputs(model, batch), reference)
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert not model._forward_pre_hooks


def test_only_mole_parameters_train():
    model = molex.inject(tiny_llama(), molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2))
    random_b(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".experts." in n or ".router." in n) for n in trainable)
    batch = inputs()
    out = model(**batch, labels=batch["input_ids"])
    (out.loss + molex.total_aux_loss(model)).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_matches_peft_lora_with_one_expert():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), lora_cfg).eval()
    model = molex.inject(
        base, molex.MoLEConfig(target_modules=["q_proj", "v_proj"], rank=4, alpha=8, num_experts=1, top_k=1)
    )
    peft_modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in molex.mole_layers(model).items():
            lora = peft_modules[f"base_model.model.{name}"]
            layer.experts.lora_A[0].copy_(lora.lora_A["default"].weight)
            layer.experts.lora_B[0].copy_(lora.lora_B["default"].weight.t())
        batch = inputs()
        torch.testing.assert_close(outputs(model, batch), outputs(peft_model, batch), atol=1e-6, rtol=0)


def test_generate_with_kv_cache_matches_base_while_b_is_zero():
    base = tiny_llama()
    batch = inputs()
    expected = base.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = molex.inject(base, molex.MoLEConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4))
    got = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    random_b(model)
    changed = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert changed.shape == expected.shape


def test_bf16_model_and_any_input_shape():
    model = tiny_llama().to(torch.bfloat16)
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=2, top_k=1))
    random_b(model)
    layer = next(iter(molex.mole_layers(model).values()))
    assert layer.experts.lora_A.dtype == torch.float32  # experts kept in fp32 (like PEFT)
    assert layer.router.gate.weight.dtype == torch.float32  # routers run in fp32
    out = outputs(model, inputs())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    x = torch.randn(2, 3, 5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 5, 32) and y.dtype == torch.bfloat16


def test_regex_and_suffix_targets_and_exclusion():
    model = tiny_llama()
    molex.inject(model, molex.MoLEConfig(target_modules=r".*layers\.[01]\.self_attn\.(q|k)_proj", num_experts=2))
    assert sorted(molex.mole_layers(model)) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "kq"]
    molex.unload(model)
    molex.inject(
        model, molex.MoLEConfig(target_modules=["self_attn.q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    )
    assert "model.layers.0.self_attn.q_proj" not in molex.mole_layers(model)
    assert len(molex.mole_layers(model)) == 3


def test_summary_reports_layers_and_params():
    model = molex.inject(
        tiny_llama(),
        molex.MoLEConfig(target_modules=["q_proj"], allocation=molex.AllocationConfig(schedule="mola-increasing")),
    )
    text = molex.summary(model)
    assert "model.layers.3.self_attn.q_proj" in text and "trainable of" in text
    rows = [line.split() for line in text.splitlines()[1:-1]]
    assert [int(r[1]) for r in rows] == [2, 4, 6, 8]


def test_bad_input_errors():
    model = tiny_llama()
    with pytest.raises(
        ValueError,
        match=r"matched no module of LlamaForCausalLM\. Did you mean \['q_proj',.*Linear layers in this model",
    ):
        molex.inject(model, molex.MoLEConfig(target_modules=["q_prj"]))
    with pytest.raises(TypeError, match=r"'model.layers.0.mlp' is a LlamaMLP, which cannot host .*'down_proj'"):
        molex.inject(model, molex.MoLEConfig(target_modules=["layers.0.mlp"]))
    with pytest.raises(ValueError, match="unknown router 'mixtral'; known routers:"):
        molex.MoLEConfig(target_modules=["q_proj"], router="mixtral")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        molex.MoLEConfig(target_modules=["q_proj"], rank=0)
    with pytest.raises(ValueError, match="has no top_k option"):
        molex.MoLEConfig(target_modules=["q_proj"], router="soft", top_k=2)
    alloc = molex.AllocationConfig(schedule="mola-increasing")
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' \(2 experts\).*top_k=3 exceeds"):
        molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], top_k=3, allocation=alloc))
    assert not molex.mole_layers(model)  # nothing half-injected
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has MoLE layers"):
        molex.inject(model, molex.MoLEConfig(target_modules=["v_proj"]))


def test_routing_inputs_reach_the_context_and_never_the_model():
    model = molex.inject(tiny_llama(), molex.MoLEConfig(target_modules=["q_proj"], num_experts=2))
    ctx = molex.layer.context.get_context(model)
    batch = inputs()
    task_ids = torch.tensor([1, 0])
    model(**batch, task_ids=task_ids)  # popped by the pre-hook: the model never sees it
    assert ctx.get("task_ids") is task_ids and ctx.is_prefill and ctx.batch_size == 2
    assert ctx.token_mask(14).tolist() == batch["attention_mask"].flatten().bool().tolist()
    generations = ctx.generation
    out = molex.generate(model, **batch, task_ids=task_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    assert ctx.generation == generations + 1  # one prefill, then decode steps reuse it
    assert ctx.get("task_ids") is None  # pinned inputs end with the generation
    with pytest.raises(ValueError, match="unknown routing input"), molex.routing_inputs(model, task_id=task_ids):
        pass
