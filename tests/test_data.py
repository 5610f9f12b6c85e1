"""The built-in dataset, prompt templates, collation/packing, and the InstructionDataModule on local files."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from molex.data.builtin import BUILTIN_TASKS, SPLITS, TASKS, make_builtin_dataset, split_of
from molex.data.collate import pack_features, packed_collate, pad_collate
from molex.data.templates import IGNORE_INDEX, encode_example, format_prompt, resolve_template
from molex.models import load_model

datasets = pytest.importorskip("datasets")
pytest.importorskip("lightning")
from molex.data.datamodule import InstructionDataModule  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only contend


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


def _records(n: int, tasks=("a", "b", "c")) -> list[dict]:
    return [
        {"instruction": f"Say {i}", "input": f"x{i}", "output": f"y{i}", "task": tasks[i % len(tasks)]}
        for i in range(n)
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- built-in data
def test_builtin_has_distinct_tasks_with_short_correct_answers():
    assert len(TASKS) >= 6 and len(set(TASKS)) == len(TASKS)
    assert len({t.instruction for t in BUILTIN_TASKS}) == len(TASKS)
    examples = make_builtin_dataset("train", 50, seed=0)
    assert {e["task"] for e in examples} == set(TASKS)
    for e in examples:
        assert set(e) == {"instruction", "input", "output", "task"}
        assert e["output"].lower() != e["input"].lower(), e  # echoing the input never scores
        assert 0 < len(e["output"].split()) <= 4, e
        if e["task"] == "add":
            a, b = e["input"].split(" + ")
            assert int(e["output"]) == int(a) + int(b)
        elif e["task"] == "sort":
            numbers = [int(x) for x in e["input"].split(", ")]
            assert e["output"] == ", ".join(map(str, sorted(numbers)))
        elif e["task"] == "reverse":
            assert e["output"].split() == e["input"].split()[::-1]
        elif e["task"] == "hyphenate":
            assert e["output"].split("-") == e["input"].split()
        elif e["task"] == "count":
            assert int(e["output"]) == len(e["input"].split(", "))
        elif e["task"] == "parity":
            assert e["output"] == ("even" if int(e["input"]) % 2 == 0 else "odd")


def test_builtin_is_deterministic_and_seeded():
    assert make_builtin_dataset("train", 30, seed=1) == make_builtin_dataset("train", 30, seed=1)
    assert make_builtin_dataset("train", 30, seed=1) != make_builtin_dataset("train", 30, seed=2)


def test_builtin_is_light_and_identical_in_a_fresh_interpreter():
    """Another process (another hash seed) generates the same data, without importing Lightning or datasets."""
    code = (
        "import json, sys, molex.data, molex.data.templates, molex.data.collate, molex.evaluation.generation\n"
        "from molex.data.builtin import make_builtin_dataset\n"
        "heavy = [m for m in ('lightning', 'datasets', 'hydra') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'data': make_builtin_dataset('test', 5, 7)}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": "."}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    assert result["data"] == make_builtin_dataset("test", 5, 7)


def test_builtin_splits_are_disjoint_whatever_the_seeds():
    keys = {}
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        keys[split] = {(e["task"], e["input"]) for e in make_builtin_dataset(split, 150, seed)}
        for e in make_builtin_dataset(split, 20, seed + 10):
            assert split_of(next(t for t in BUILTIN_TASKS if t.name == e["task"]), e["input"]) == split
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    counts = {t: sum(1 for k in keys["test"] if k[0] == t) for t in TASKS}
    assert min(counts.values()) >= 15  # even finite-pool tasks keep a measurable test split


def test_builtin_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_builtin_dataset("dev", 3, 0)
    with pytest.raises(ValueError, match=r"unknown built-in task\(s\) \['nope'\]"):
        make_builtin_dataset("train", 3, 0, tasks=["add", "nope"])
    only = make_builtin_dataset("train", 4, 0, tasks=["add", "parity"])
    assert sorted({e["task"] for e in only}) == ["add", "parity"] and len(only) == 8


# ---------------------------------------------------------------------------------------------- templates
def test_labels_mask_the_prompt_and_learn_answer_plus_eos(tok):
    ex = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}
    for template in ("chat", "plain"):
        enc = encode_example(tok, ex, template)
        n_prompt = sum(enc.prompt_mask)
        assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
        assert tok.decode(enc.input_ids[n_prompt:]) == "5" + tok.eos_token
        assert tok.decode(enc.input_ids[:n_prompt]) == format_prompt(tok, ex, template)
        assert not enc.truncated and enc.answer_tokens == 2
    assert format_prompt(tok, ex, "plain").endswith("### Input:\n2 + 3\n\n### Response:\n")
    chat = format_prompt(tok, ex, "chat", system_prompt="Be brief.")
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_chat_template_falls_back_to_plain(tok, caplog):
    bare = load_model("tiny-llama")[1]
    bare.chat_template = None
    with caplog.at_level(logging.INFO, logger="molex.data.templates"):
        assert resolve_template(bare, "chat") == "plain"
    assert "no chat template" in caplog.text
    assert resolve_template(tok, "chat") == "chat"
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'"):
        resolve_template(tok, "alpaca")


# ---------------------------------------------------------------------------------------------- collation
def test_pad_collate_right_and_left():
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_mask": [1, 0, 0], "task_id": 2},
        {"input_ids": [8], "labels": [8], "prompt_mask": [0], "task_id": 0},
    ]
    right = pad_collate(feats, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["task_ids"].tolist() == [2, 0]
    left = pad_collate(feats, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["prompt_mask"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]


def test_packing_keeps_tasks_apart_and_matches_unpacked_logits(tiny):
    model, tok = tiny
    examples = make_builtin_dataset("train", 3, 0, tasks=["add", "parity"])
    feats = []
    for e in examples:
        enc = encode_example(tok, e, "plain")
        feats.append(
            {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "prompt_mask": enc.prompt_mask,
                "task_id": int(e["task"] == "add"),
            }
        )
    rows = pack_features(feats, max_length=200)
    assert len(rows) < len(feats)
    assert all(len(r["input_ids"]) <= 200 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(f["input_ids"]) for f in feats)
    batch = packed_collate(rows, pad_token_id=tok.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "use_cache")}
        packed = model(**inputs).logits
        # each packed example must see only itself: compare with the example run alone
        for r_index, r in enumerate(rows):
            starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
            for s, e in itertools.pairwise(starts):
                alone = model(input_ids=torch.tensor([r["input_ids"][s:e]])).logits[0]
                torch.testing.assert_close(packed[r_index, s:e], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit max_length=4"):
        pack_features(feats, max_length=4)


# ---------------------------------------------------------------------------------------------- data module
def test_datamodule_builtin_batches(tok):
    dm = InstructionDataModule(tokenizer=tok, num_per_task=4, eval_per_task=2, batch_size=5, max_length=128)
    assert dm.task_names == list(TASKS)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_mask", "task_ids"}
    B, S = batch["input_ids"].shape
    assert B == 5 and batch["task_ids"].shape == (B,)
    for key in ("attention_mask", "labels", "prompt_mask"):
        assert batch[key].shape == (B, S)
    # right padding; labels only on answer tokens, never on the prompt or padding
    assert (batch["attention_mask"][:, 0] == 1).all()
    answer = batch["labels"] != IGNORE_INDEX
    assert not (answer & batch["prompt_mask"].bool()).any()
    assert not (answer & ~batch["attention_mask"].bool()).any()
    assert ((batch["prompt_mask"] == 1) | answer | (batch["attention_mask"] == 0)).all()
    # task ids agree with the decoded instructions
    for row, task_id in zip(batch["input_ids"], batch["task_ids"], strict=True):
        task = BUILTIN_TASKS[TASKS.index(dm.task_names[task_id])]
        assert task.instruction in tok.decode(row)
    assert len(dm.test_examples()) == len(dm.datasets["test"]) == 2 * len(TASKS)
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == 5
    no_eval = InstructionDataModule(tokenizer=tok, num_per_task=2, eval_per_task=0, builtin_tasks=["add"])
    no_eval.setup()
    assert len(no_eval.datasets["train"]) == 2 and no_eval.test_examples() == []
    with pytest.raises(ValueError, match="the test split is empty"):
        no_eval.test_dataloader()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_datamodule_reads_every_file_format_the_same(tok, tmp_path, fmt):
    rows = _records(30)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        frame = datasets.Dataset.from_list(rows)
        frame.to_csv(str(path), index=False) if fmt == "csv" else frame.to_parquet(str(path))
    dm = InstructionDataModule(tokenizer=tok, source=str(path), seed=3, val_fraction=0.2, test_fraction=0.1)
    reference = InstructionDataModule(
        tokenizer=tok,
        source=str(_write_jsonl(tmp_path / "ref.jsonl", rows)),
        seed=3,
        val_fraction=0.2,
        test_fraction=0.1,
    )
    assert dm.test_examples() == reference.test_examples()
    assert [len(dm.examples(s)) for s in SPLITS] == [21, 6, 3]
    assert dm.task_names == ["a", "b", "c"]


def test_splits_are_deterministic_disjoint_and_seeded(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(40))

    def split_inputs(seed):
        dm = InstructionDataModule(tokenizer=tok, source=str(path), seed=seed)
        return {s: [e["input"] for e in dm.examples(s)] for s in SPLITS}

    first, again, other = split_inputs(0), split_inputs(0), split_inputs(1)
    assert first == again
    assert first["test"] != other["test"]
    sets = [set(first[s]) for s in SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 40


def test_folder_and_split_dict_sources(tok, tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _records(10))
    _write_jsonl(tmp_path / "dev.jsonl", _records(4, tasks=("b",)))
    dm = InstructionDataModule(tokenizer=tok, source=str(tmp_path), test_fraction=0.2)
    assert [len(dm.examples(s)) for s in SPLITS] == [8, 4, 2]
    dm2 = InstructionDataModule(
        tokenizer=tok,
        source={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "dev.jsonl")},
        val_fraction=0.0,
    )
    assert [len(dm2.examples(s)) for s in SPLITS] == [10, 0, 4]
    dm2.setup()
    with pytest.raises(ValueError, match="the validation split is empty"):
        dm2.val_dataloader()


def test_empty_missing_and_unsupported_files_are_clear_errors(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        InstructionDataModule(tokenizer=tok, source=str(empty)).setup()
    blank_json = tmp_path / "blank.json"
    blank_json.write_text("[]")
    with pytest.raises(ValueError, match="is empty"):
        InstructionDataModule(tokenizer=tok, source=str(blank_json)).setup()
    with pytest.raises(FileNotFoundError, match="data file not found"):
        InstructionDataModule(tokenizer=tok, source=str(tmp_path / "nope.jsonl")).setup()
    with pytest.raises(ValueError, match="unsupported data file"):
        InstructionDataModule(tokenizer=tok, source=str(tmp_path / "data.txt")).setup()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        InstructionDataModule(num_per_task=2, eval_per_task=1).setup()


def test_missing_columns_name_what_is_missing_and_found(tok, tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "category": "t"} for i in range(12)]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(
        ValueError,
        match=r"instruction \(column 'instruction'\).*output \(column 'output'\).*\['question', 'answer', 'category'\]",
    ):
        InstructionDataModule(tokenizer=tok, source=str(path)).setup()
    with pytest.raises(ValueError, match=r"task \(column 'topic'\)"):
        InstructionDataModule(
            tokenizer=tok, source=str(path), columns={"instruction": "question", "output": "answer", "task": "topic"}
        ).setup()
    with pytest.raises(ValueError, match="unknown field"):
        InstructionDataModule(tokenizer=tok, source=str(path), columns={"prompt": "question"})
    dm = InstructionDataModule(
        tokenizer=tok, source=str(path), columns={"instruction": "question", "output": "answer", "task": "category"}
    )
    dm.setup()
    assert dm.task_names == ["t"] and dm.examples("train")[0]["input"] == ""


def test_overlong_examples_are_truncated_and_counted(tok, tmp_path, caplog):
    rows = _records(20)
    rows[0]["input"] = "long " * 40  # its prompt alone exceeds max_length: the answer is lost, so it is dropped
    rows[1]["output"] = "z" * 30  # the answer is cut but partly kept
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    dm = InstructionDataModule(
        tokenizer=tok, source=str(path), template="plain", max_length=60, val_fraction=0.0, test_fraction=0.0
    )
    with caplog.at_level(logging.WARNING, logger="molex.data.datamodule"):
        dm.setup()
    assert dm.truncated["train"] == 2 and dm.dropped["train"] == 1
    assert len(dm.datasets["train"]) == 19
    assert "truncated 2 of 20" in caplog.text
    assert max(len(x) for x in dm.datasets["train"]["input_ids"]) == 60
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 60


def test_task_names_order_and_unknown_values(tok, tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", _records(12, tasks=("zeta", "alpha")))
    dm = InstructionDataModule(tokenizer=tok, source=str(path), task_names=["mid"], val_fraction=0.0, test_fraction=0.0)
    assert dm.task_names == ["mid", "alpha", "zeta"]
    dm.setup()
    ids = dm.datasets["train"]["task_id"]
    tasks = [e["task"] for e in dm.examples("train")]
    assert [dm.task_names[i] for i in ids] == tasks


def test_packed_datamodule(tok):
    dm = InstructionDataModule(
        tokenizer=tok,
        num_per_task=6,
        eval_per_task=1,
        batch_size=4,
        max_length=256,
        packing=True,
        builtin_tasks=["add", "parity", "capital"],
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "prompt_mask", "position_ids", "task_ids", "use_cache"}
    assert batch["input_ids"].shape[1] <= 256
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]  # several examples per row
    assert set(next(iter(dm.val_dataloader()))) >= {"attention_mask"}  # evaluation stays unpacked


def test_bad_constructor_arguments(tok):
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        InstructionDataModule(tokenizer=tok, max_length=1)
    with pytest.raises(ValueError, match="must leave some training data"):
        InstructionDataModule(tokenizer=tok, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(FileNotFoundError, match="not a local file or folder"):
        InstructionDataModule(tokenizer=tok, source="no-such-org/no-such-dataset").setup()


def test_choices_column_reaches_the_test_examples(tok, tmp_path):
    rows = [
        {"question": f"Pick {i}", "options": ["yes", "no"], "label": "yes" if i % 2 else "no", "task": "yn"}
        for i in range(10)
    ]
    path = _write_jsonl(tmp_path / "mc.jsonl", rows)
    columns = {"instruction": "question", "output": "label", "choices": "options"}
    dm = InstructionDataModule(tokenizer=tok, source=str(path), columns=columns, test_fraction=0.3)
    test = dm.test_examples()
    assert len(test) == 3
    assert all(e["choices"] == ["yes", "no"] and e["output"] in e["choices"] for e in test)
