"""Built-in data sizes: separate validation and test sizes, and pools large enough for 40 test examples
per task without sharing an input (or, for antonyms, a reversed pair) across splits."""

from __future__ import annotations

from collections import Counter

import pytest

from molex.data.builtin import BUILTIN_TASKS, SPLITS, TASKS, make_builtin_dataset, split_of
from molex.data.datamodule import InstructionDataModule


@pytest.mark.parametrize("seed", [0, 3])
def test_every_task_has_40_test_examples_and_splits_stay_disjoint(seed):
    drawn = {split: make_builtin_dataset(split, 40, seed) for split in SPLITS}
    counts = Counter(e["task"] for e in drawn["test"])
    assert set(counts) == set(TASKS) and min(counts.values()) == 40, counts
    keys = {split: {(e["task"], e["input"]) for e in rows} for split, rows in drawn.items()}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert min(Counter(e["task"] for e in drawn["validation"]).values()) >= 20


@pytest.mark.parametrize("task", [t for t in BUILTIN_TASKS if t.pool], ids=lambda t: t.name)
def test_pools_are_unambiguous_and_reversed_pairs_share_a_split(task):
    inputs = [i for i, _ in task.pool]
    assert len(inputs) == len(set(inputs))  # one answer per input
    assert all(o and len(o.split()) <= 3 for _, o in task.pool)  # short answers
    test = [pair for pair in task.pool if split_of(task, pair[0]) == "test"]
    assert len(test) >= 40
    answers = dict(task.pool)
    for word, opposite in task.pool if task.symmetric else ():
        if answers.get(opposite) == word:  # the pair read backwards is in the same split
            assert split_of(task, word) == split_of(task, opposite)


def test_val_and_test_sizes_default_to_eval_per_task():
    sized = InstructionDataModule(num_per_task=3, eval_per_task=5, val_per_task=2, test_per_task=4)
    assert Counter(e["task"] for e in sized.examples("validation"))["add"] == 2
    assert Counter(e["task"] for e in sized.examples("test"))["add"] == 4
    plain = InstructionDataModule(num_per_task=3, eval_per_task=5, builtin_tasks=["add", "capital"])
    for split in ("validation", "test"):
        assert Counter(e["task"] for e in plain.examples(split)) == {"add": 5, "capital": 5}
    # the test split does not depend on the validation size (each split draws on its own)
    other = InstructionDataModule(num_per_task=3, eval_per_task=5, val_per_task=7, builtin_tasks=["add", "capital"])
    assert other.examples("test") == plain.examples("test")


def test_negative_sizes_name_the_option():
    with pytest.raises(ValueError, match="test_per_task must be >= 0, got -1"):
        InstructionDataModule(test_per_task=-1)
    with pytest.raises(ValueError, match="val_per_task must be >= 0, got -2"):
        InstructionDataModule(val_per_task=-2)
