"""Evaluation: forced-answer models for exact match and multiple choice, loss against HF's own, routing inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import molex
from molex.data.builtin import TASKS, make_builtin_dataset
from molex.data.collate import pad_collate
from molex.data.templates import encode_example
from molex.evaluation.generation import (
    evaluate_generation,
    evaluate_loss,
    format_table,
    normalize_answer,
    score_multiple_choice,
)
from molex.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only contend


def _forced(token: str, seed: int = 0):
    """A tiny Llama whose next-token distribution is the same everywhere: ``token`` far ahead of the rest."""
    model, tok = load_model("tiny-llama", seed=seed, config_overrides={"tie_word_embeddings": False})
    head = nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.linspace(0.0, 1.0, len(tok)))  # distinct, prompt-independent scores
        head.bias[tok.convert_tokens_to_ids(token)] = 20.0
    model.lm_head = head
    return model, tok


def test_normalize_answer():
    assert normalize_answer("  Paris \n") == "paris"
    assert normalize_answer("New   York") == normalize_answer("new york")


def test_exact_match_on_a_forced_model():
    model, tok = _forced("a")
    examples = [
        {"instruction": "Say it.", "input": "x", "output": " AAAA ", "task": "shout"},  # normalised: matches
        {"instruction": "Say it.", "input": "", "output": "aaa", "task": "shout"},  # too short: no match
        {"instruction": "Other.", "input": "y", "output": "aaaa", "task": "calm"},
    ]
    result = evaluate_generation(model, tok, examples, max_new_tokens=4, batch_size=2)
    assert [p["prediction"] for p in result["predictions"]] == ["aaaa"] * 3
    assert [p["correct"] for p in result["predictions"]] == [True, False, True]
    assert result["per_task"] == {"shout": 0.5, "calm": 1.0}
    assert result["counts"] == {"shout": 2, "calm": 1}
    assert result["accuracy"] == pytest.approx(2 / 3) and result["num_examples"] == 3


def test_generation_stops_at_eos_and_batching_does_not_change_answers():
    model, tok = load_model("tiny-llama", seed=5)
    examples = make_builtin_dataset("test", 2, 0)  # prompts of different lengths: left padding matters
    one = evaluate_generation(model, tok, examples, max_new_tokens=6, batch_size=1)
    many = evaluate_generation(model, tok, examples, max_new_tokens=6, batch_size=16)
    assert [p["prediction"] for p in one["predictions"]] == [p["prediction"] for p in many["predictions"]]
    forced_eos, tok = _forced("<|im_end|>")
    result = evaluate_generation(forced_eos, tok, [{"instruction": "q", "output": ""}], max_new_tokens=5)
    assert result["predictions"][0]["prediction"] == "" and result["accuracy"] == 1.0


def test_training_on_the_labels_makes_generation_exact():
    """Prompt masking, the answer boundary and the generation prompt agree: a model fit on the labels says them."""
    model, tok = load_model("tiny-llama", seed=1)
    examples = make_builtin_dataset("train", 1, 0, tasks=["add", "parity", "capital", "antonym"])
    feats = []
    for i, ex in enumerate(examples):
        enc = encode_example(tok, ex, "chat")
        feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "prompt_mask": enc.prompt_mask, "task_id": i})
    batch = pad_collate(feats, pad_token_id=tok.pad_token_id)
    before = evaluate_generation(model, tok, examples, max_new_tokens=12)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(120):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_generation(model, tok, examples, max_new_tokens=12, batch_size=3)
    assert before["accuracy"] == 0.0
    assert after["accuracy"] == 1.0, after["predictions"]
    assert "overall" in format_table(before, after)


def test_evaluate_loss_matches_transformers_and_weights_tokens():
    model, tok = load_model("tiny-llama", seed=2)
    feats = []
    for ex in make_builtin_dataset("validation", 1, 0):
        enc = encode_example(tok, ex, "plain")
        feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "prompt_mask": enc.prompt_mask, "task_id": 0})
    whole = pad_collate(feats, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        reference = model(
            input_ids=whole["input_ids"], attention_mask=whole["attention_mask"], labels=whole["labels"]
        ).loss.item()
    # one batch or uneven batches: the same token-weighted mean
    assert evaluate_loss(model, [whole]) == pytest.approx(reference, rel=1e-5)
    batches = [pad_collate(feats[:1], pad_token_id=0), pad_collate(feats[1:], pad_token_id=0)]
    assert evaluate_loss(model, batches) == pytest.approx(reference, rel=1e-5)
    empty = {**whole, "labels": torch.full_like(whole["labels"], -100)}
    with pytest.raises(ValueError, match="no label tokens"):
        evaluate_loss(model, [empty])


def test_multiple_choice_picks_the_forced_answer_and_scores_exactly():
    model, tok = _forced("b")
    examples = [
        {"instruction": "Pick one.", "input": "", "choices": ["a", "b", "c"], "output": "b", "task": "t1"},
        {"instruction": "Pick one.", "input": "q", "choices": ["bb", "ab"], "answer": 1, "task": "t2"},
    ]
    result = score_multiple_choice(model, tok, examples, batch_size=2)
    assert result["predictions"] == [1, 0]
    assert result["per_task"] == {"t1": 1.0, "t2": 0.0} and result["accuracy"] == 0.5
    logp = torch.log_softmax(model.lm_head.bias.double(), -1)
    ids = {c: tok.convert_tokens_to_ids(c) for c in "abc"}
    expected = [
        [logp[ids[c]].item() for c in "abc"],
        [2 * logp[ids["b"]].item(), (logp[ids["a"]] + logp[ids["b"]]).item()],
    ]
    for got, want in zip(result["scores"], expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    mean = score_multiple_choice(model, tok, examples[1:], length_normalize=True)
    assert mean["scores"][0][0] == pytest.approx(logp[ids["b"]].item(), rel=1e-5, abs=1e-5)


def test_multiple_choice_bad_input():
    model, tok = _forced("a")
    with pytest.raises(ValueError, match="not one of the choices"):
        score_multiple_choice(model, tok, [{"instruction": "x", "choices": ["a", "b"], "output": "z"}])
    with pytest.raises(ValueError, match="at least 2"):
        score_multiple_choice(model, tok, [{"instruction": "x", "choices": ["a"], "output": "a"}])
    with pytest.raises(ValueError, match="out of range"):
        score_multiple_choice(model, tok, [{"instruction": "x", "choices": ["a", "b"], "answer": 2}])


def test_injected_model_gets_task_ids_and_prompt_mask_during_generation():
    model, tok = load_model("tiny-llama")
    molex.inject(
        model, molex.MoLEConfig(target_modules=["q_proj"], rank=2, alpha=4, num_experts=2, router="topk", top_k=1)
    )
    layer = next(iter(molex.mole_layers(model).values()))
    seen = []
    layer.register_forward_pre_hook(
        lambda m, args: seen.append(
            (m.context.get("task_ids"), m.context.get("prompt_mask"), m.context.is_prefill, m.context.input_ids)
        )
    )
    examples = make_builtin_dataset("test", 1, 0, tasks=["add", "parity"])
    evaluate_generation(model, tok, examples, max_new_tokens=2, task_names=TASKS)
    prefill = [s for s in seen if s[2]]
    assert len(prefill) == 1 and len(seen) >= 2
    task_ids, prompt_mask, _, input_ids = prefill[0]
    assert sorted(task_ids.tolist()) == sorted(TASKS.index(e["task"]) for e in examples)
    for row, task_id in zip(input_ids, task_ids, strict=True):  # each row's task id names that row's task
        example = next(e for e in examples if e["task"] == TASKS[task_id])
        assert example["instruction"] in tok.decode(row)
    assert prompt_mask.shape[0] == 2 and prompt_mask.dtype == torch.long
    assert layer.context.pinned == {}  # released after generation
    with pytest.raises(ValueError, match=r"task\(s\) \['add'\] that are not in task_names"):
        evaluate_generation(model, tok, examples, max_new_tokens=1, task_names=["parity"])
    # the loss path passes the routing inputs of a collated batch through the call
    seen.clear()
    enc = [encode_example(tok, e, "chat") for e in examples]
    feats = [
        {"input_ids": x.input_ids, "labels": x.labels, "prompt_mask": x.prompt_mask, "task_id": i}
        for i, x in enumerate(enc)
    ]
    evaluate_loss(model, [pad_collate(feats, pad_token_id=tok.pad_token_id)])
    assert seen[0][0].tolist() == [0, 1]


def test_format_table_rows_and_missing_values():
    before = {
        "accuracy": 0.25,
        "per_task": {"add": 0.0, "sort": 0.5},
        "counts": {"add": 2, "sort": 2},
        "num_examples": 4,
    }
    after = {
        "accuracy": 0.75,
        "per_task": {"add": 1.0, "sort": 0.5, "new": 1.0},
        "counts": {"add": 2, "sort": 2, "new": 1},
        "num_examples": 5,
    }
    table = format_table(before, after, tasks=["sort", "add"])
    lines = table.splitlines()
    assert lines[0].split() == ["task", "n", "before", "after", "change"]
    assert lines[2].split() == ["sort", "2", "50.0", "50.0", "0.0"]
    assert lines[3].split() == ["add", "2", "0.0", "100.0", "100.0"]
    assert lines[4].split() == ["new", "1", "-", "100.0", "-"]
    assert lines[-1].split() == ["overall", "5", "25.0", "75.0", "50.0"]


def test_format_table_labels_and_markdown():
    before = {"per_task": {"add": 0.5}, "counts": {"add": 2}}
    after = {"accuracy": 1.0, "per_task": {"add": 1.0}, "counts": {"add": 2}, "num_examples": 2}
    lines = format_table(before, after, labels=("alone", "fused"), markdown=True).splitlines()
    assert lines[0] == "| task | n | alone | fused | change |"
    assert lines[2] == "| add | 2 | 50.0 | 100.0 | 50.0 |"
    assert lines[-1] == "| overall | 2 | - | 100.0 | - |"
    plain = format_table(before, after, labels=("adapter alone", "fused")).splitlines()
    assert plain[0].split() == ["task", "n", "adapter", "alone", "fused", "change"]


def test_bf16_evaluation_is_close_to_float32_and_bad_precision_is_named():
    model, tok = load_model("tiny-llama", seed=2)
    feats = []
    for ex in make_builtin_dataset("validation", 1, 0):
        enc = encode_example(tok, ex, "plain")
        feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "prompt_mask": enc.prompt_mask, "task_id": 0})
    whole = pad_collate(feats, pad_token_id=tok.pad_token_id)
    full = evaluate_loss(model, [whole])
    half = evaluate_loss(model, [whole], precision="bf16")
    assert half != full and half == pytest.approx(full, rel=2e-2)  # bfloat16 products: close, not identical
    forced, tok = _forced("a")
    examples = [{"instruction": "Say it.", "input": "x", "output": "aaaa", "task": "t"}]
    result = evaluate_generation(forced, tok, examples, max_new_tokens=4, precision="bf16")
    assert result["predictions"][0]["prediction"] == "aaaa"  # a clear winner survives bfloat16
    with pytest.raises(ValueError, match="precision must be one of \\['float32', 'bf16'\\], got 'fp8'"):
        evaluate_generation(forced, tok, examples, precision="fp8")
    with pytest.raises(ValueError, match="got 'half'"):
        evaluate_loss(model, [whole], precision="half")
