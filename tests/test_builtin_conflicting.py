"""The built-in conflicting set: 16 tasks that map the same word lists to different outputs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from molex.data.builtin import SPLITS, builtin_set, make_builtin_dataset, split_of
from molex.data.builtin_conflicting import SET_TASKS


def test_sixteen_tasks_give_different_answers_to_the_same_inputs():
    assert len(SET_TASKS) >= 16 and len({t.name for t in SET_TASKS}) == len(SET_TASKS)
    distinct = []
    for seed in range(50):
        pairs = [task.sample(random.Random(seed)) for task in SET_TASKS]
        assert len({i for i, _ in pairs}) == 1  # one shared input generator: the input never names the task
        distinct.append(len({o for _, o in pairs}))
    assert min(distinct) >= 11 and sum(distinct) / len(distinct) >= 14  # maps rarely agree on an input


def test_the_documented_example():
    maps = {t.name: t for t in SET_TASKS}
    from molex.data.builtin_conflicting import _MAPS

    words = ["moon", "cat", "tree", "dog", "cat"]
    got = {name: fn(words) for name, (_, fn) in _MAPS.items()}
    assert got["sort"] == "cat cat dog moon tree" and got["dedupe"] == "moon cat tree dog"
    assert got["count"] == "5" and got["by_length"] == "cat dog cat moon tree" and got["initials"] == "mctdc"
    assert set(maps) == set(_MAPS)


@pytest.mark.parametrize("split", SPLITS)
def test_splits_are_disjoint_and_every_task_is_present(split):
    rows = make_builtin_dataset(split, 20, seed=3, collection="conflicting")
    assert Counter(r["task"] for r in rows) == {t.name: 20 for t in SET_TASKS}
    tasks = {t.name: t for t in SET_TASKS}
    assert all(split_of(tasks[r["task"]], r["input"]) == split for r in rows)
    assert rows == make_builtin_dataset(split, 20, seed=3, collection="conflicting")  # deterministic


def test_unknown_sets_and_tasks_name_the_value():
    with pytest.raises(ValueError, match=r"unknown built-in set 'conflict'.*multitask.*conflicting"):
        builtin_set("conflict")
    with pytest.raises(ValueError, match=r"unknown built-in set '\.\./x'"):
        builtin_set("../x")
    with pytest.raises(ValueError, match=r"unknown built-in task\(s\) \['add'\] of the 'conflicting' set"):
        make_builtin_dataset("train", 2, tasks=["add"], collection="conflicting")


def test_the_data_module_and_the_command_line_group_select_it():
    from hydra import compose, initialize_config_dir

    from molex.data.datamodule import InstructionDataModule
    from tests.helpers.cli import CONF

    dm = InstructionDataModule(source="builtin", builtin_set="conflicting", num_per_task=2, eval_per_task=1)
    assert dm.task_names == [t.name for t in SET_TASKS]
    with pytest.raises(ValueError, match=r"builtin_tasks \['add'\] are not tasks of the 'conflicting' built-in set"):
        InstructionDataModule(source="builtin", builtin_set="conflicting", builtin_tasks=["add"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=builtin_conflicting"])
    assert cfg.data.builtin_set == "conflicting" and cfg.data.source == "builtin"
