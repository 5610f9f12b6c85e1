"""lm-evaluation-harness on molex models, offline: a local multiple-choice task (a YAML over a JSONL file)
scored through ``molex-eval lm_eval.tasks=[...]`` agrees with :func:`molex.evaluation.generation.score_multiple_choice`,
and the routing inputs (task ids, prompt mask, padding) reach the routers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'molex-lora[eval]')")

from hydra import compose, initialize_config_dir

import molex
from molex.data.builtin import TASKS
from molex.data.templates import format_prompt
from molex.evaluation.generation import score_multiple_choice
from molex.evaluation.harness import LMEvalRequestError, run_lm_eval
from molex.models import load_model
from tests.helpers.cli import CONF

TASK = "molex_local_mc"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_task(folder: Path, tokenizer, count: int = 12) -> list[dict]:
    """A multiple-choice task over a local JSONL file: molex's plain prompt, three choices, answer index."""
    rng = random.Random(0)
    items = []
    for _ in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        item = {"instruction": f"Add {a} and {b}.", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)]}
        item["answer"] = rng.randrange(3)
        item["prompt"] = format_prompt(tokenizer, item, "plain")
        items.append(item)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return items


def tiny_molex(router: str = "topk", seed: int = 1, **options):
    """tiny-llama with MoLE layers whose B factors and router weights are large and random, so the experts
    change the logits and the routers' choices depend on their inputs."""
    model, tokenizer = load_model("tiny-llama")
    config = molex.MoLEConfig(
        target_modules=["q_proj", "v_proj", "o_proj"], rank=4, num_experts=4, router=router, router_options=options
    )
    torch.manual_seed(seed)  # the experts' A factors come from the global generator
    molex.inject(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif "router" in name:  # no bias: the choice then follows the (small) input embeddings
                param.copy_(torch.randn(param.shape, generator=generator) * 3.0 if param.dim() > 1 else 0.0)
    return model.eval(), tokenizer


def compose_eval(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="eval", overrides=["model=tiny_llama", f"run_dir={tmp_path / 'run'}", *overrides])


def test_molex_eval_local_task_matches_the_molex_multiple_choice_scorer(tmp_path, capsys):
    from molex.cli.eval import evaluate

    model, tokenizer = tiny_molex(top_k=2)
    molex.save_adapter(model, tmp_path / "adapter")
    items = write_task(tmp_path / "tasks", tokenizer)
    cfg = compose_eval(
        tmp_path,
        f"adapter={tmp_path / 'adapter'}",
        f"lm_eval.tasks=[{TASK}]",
        f"lm_eval.include_path={tmp_path / 'tasks'}",
        "lm_eval.num_fewshot=0",
        "lm_eval.batch_size=4",
    )
    results = evaluate(cfg)
    accuracy = results["results"][TASK]["acc,none"]
    expected = score_multiple_choice(model, tokenizer, items, template="plain", batch_size=4)
    assert accuracy == pytest.approx(expected["accuracy"], abs=1e-12)
    assert 0 < expected["accuracy"] < 1  # a random model: neither all right nor all wrong
    run = tmp_path / "run"
    saved = json.loads((run / "lm_eval.json").read_text())
    assert saved["results"][TASK]["acc,none"] == accuracy
    assert saved["molex"]["adapter"] == str(tmp_path / "adapter")
    table = (run / "lm_eval.md").read_text()
    assert TASK in table and "acc" in table and f"{accuracy:.4f}" in table
    assert table.strip() in capsys.readouterr().out


def test_per_document_choices_agree_with_the_molex_scores_and_batching(tmp_path):
    model, tokenizer = tiny_molex(router="dlp", top_p=0.6)  # sequence-level: decides from the prompt tokens
    items = write_task(tmp_path / "tasks", tokenizer, count=6)
    expected = score_multiple_choice(model, tokenizer, items, template="plain", batch_size=5)
    runs = {
        size: run_lm_eval(model, tokenizer, [TASK], include_path=tmp_path / "tasks", batch_size=size, log_samples=True)
        for size in (1, 5)
    }
    scores = {}
    for size, results in runs.items():
        samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
        scores[size] = torch.tensor([[resp[0] for resp in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    # padding and batch neighbours change nothing: each row is routed from its own prompt tokens
    torch.testing.assert_close(scores[1], scores[5], atol=1e-4, rtol=0)
    # lm-eval moves the prompt's closing newline into the continuation, which adds the same term to
    # every choice of a document; the differences between choices are molex's
    molex_scores = torch.tensor(expected["scores"], dtype=torch.float64)
    torch.testing.assert_close(scores[5] - scores[5][:, :1], molex_scores - molex_scores[:, :1], atol=1e-3, rtol=0)
    assert scores[5].argmax(1).tolist() == expected["predictions"]


def test_task_id_by_name_routes_every_sequence_to_that_task(tmp_path, monkeypatch):
    import molex.evaluation.harness as harness
    from molex.cli.eval import evaluate

    model, tokenizer = load_model("tiny-llama")
    molex.inject(
        model,
        molex.MoLEConfig(
            target_modules=["q_proj"],
            rank=2,
            num_experts=len(TASKS),
            router="features",
            router_options={"features": {"task": len(TASKS)}},
        ),
    )
    molex.save_adapter(model, tmp_path / "adapter")
    write_task(tmp_path / "tasks", tokenizer, count=4)
    (tmp_path / "tasks" / "molex_local_gen.yaml").write_text(  # greedy generation over the same items
        "task: molex_local_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tasks' / 'items.jsonl'}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["###"]\n  max_gen_toks: 3\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []
    real = harness.run_lm_eval

    def recording(model, *args, **kwargs):
        for layer in molex.mole_layers(model).values():
            layer.register_forward_hook(
                lambda m, args, out: seen.append(
                    (
                        m.last_decision.indices,
                        m.context.get("prompt_mask"),
                        m.context.attention_mask,
                        m.context.is_prefill,
                    )
                )
            )
        return real(model, *args, **kwargs)

    monkeypatch.setattr(harness, "run_lm_eval", recording)
    cfg = compose_eval(
        tmp_path,
        f"adapter={tmp_path / 'adapter'}",
        f"lm_eval.tasks=[{TASK},molex_local_gen]",
        f"lm_eval.include_path={tmp_path / 'tasks'}",
        "lm_eval.task_id=reverse",  # a task name of the data config (the built-in tasks): id 1
        "lm_eval.batch_size=3",
    )
    results = evaluate(cfg)
    assert results["molex"]["task_id"] == TASKS.index("reverse") == 1
    assert "molex_local_gen" in results["results"]
    assert any(not prefill for *_, prefill in seen)  # generation's decode steps ran (and were routed)
    answer_tokens = 0
    for indices, prompt_mask, attention, prefill in seen:
        assert indices.unique().tolist() == [1]
        if prefill:  # the prompt ends where the answer starts; padding is no token
            if attention is None:  # generate() leaves out an all-ones mask
                attention = torch.ones_like(prompt_mask)
            assert prompt_mask.shape == attention.shape and bool((prompt_mask <= attention).all())
            answer_tokens += int((attention - prompt_mask).sum())
    assert answer_tokens > 0  # multiple-choice answers of two digits or more feed tokens beyond the prompt


def test_bad_requests_fail_before_any_evaluation(tmp_path):
    model, tokenizer = tiny_molex(router="mtl", num_tasks=3)
    with pytest.raises(LMEvalRequestError, match="router 'mtl' mixes its experts per task"):
        run_lm_eval(model, tokenizer, [TASK], include_path=tmp_path)
    with pytest.raises(LMEvalRequestError, match=r"task_id= an id in 0\.\.2"):
        run_lm_eval(model, tokenizer, [TASK], include_path=tmp_path, task_id=3)
    with pytest.raises(LMEvalRequestError, match="is not a folder"):
        run_lm_eval(model, tokenizer, [TASK], include_path=tmp_path / "missing", task_id=0)
    with pytest.raises(LMEvalRequestError, match="num_fewshot must be"):
        run_lm_eval(model, tokenizer, [TASK], num_fewshot=-1, task_id=0)
    with pytest.raises(LMEvalRequestError, match="tasks must be a non-empty list"):
        run_lm_eval(model, tokenizer, "arc_easy", task_id=0)
    with pytest.raises(LMEvalRequestError, match=r"features=\{'lang': 1\} are read only by router 'features'"):
        run_lm_eval(model, tokenizer, [TASK], include_path=tmp_path, task_id=0, features={"lang": 1})
    plain, _ = load_model("tiny-llama")
    with pytest.raises(LMEvalRequestError, match="no molex layers"):
        run_lm_eval(plain, tokenizer, [TASK], task_id=0)


@pytest.mark.slow
def test_an_unknown_task_is_named(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    with pytest.raises(LMEvalRequestError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        run_lm_eval(model, tokenizer, ["no_such_task"], include_path=tmp_path)
