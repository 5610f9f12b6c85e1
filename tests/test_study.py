"""``python -m benchmarks.study``: variant configs, statistics, health measures and the quick study end to end."""

from __future__ import annotations

import json
import math
import re
import threading
import time

import pytest
import torch

from benchmarks import study
from benchmarks.study_measure import compose_config, mole_config_of, routing_health
from benchmarks.study_report import aggregate, markdown, plot
from benchmarks.study_runs import run_all
from benchmarks.study_variants import VARIANTS, variant_overrides
from molex.evaluation.analysis import RoutingReport


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_composes_into_a_valid_mole_config(name):
    config = mole_config_of(compose_config(variant_overrides(name, matched_rank=44, num_tasks=8)))
    if VARIANTS[name].mixture:
        assert config.router_name != "fixed"
    else:
        assert config.router_name == "fixed" and config.num_experts == 1
        assert config.alpha == 2 * config.rank  # the experts' alpha / rank
    if name == "lora_matched":
        assert config.rank == 44
    if name == "gate_supervised":
        assert config.num_experts == 8 and config.router_options["task_loss_coef"] > 0
    expected_router = {"adamix": "stochastic", "flix_task": "features", "mtl": "mtl", "hydra_top2": "topk"}
    if name in expected_router:
        assert config.router_name == expected_router[name]
    if name == "flix_task":
        assert config.router_options["features"] == {"task": 8}
    if name == "mtl":
        assert config.router_options["num_tasks"] == 8
    assert config.share_A == (name == "hydra_top2")


def test_variant_overrides_need_their_values():
    with pytest.raises(ValueError, match="matched_rank"):
        variant_overrides("lora_matched")
    with pytest.raises(ValueError, match="num_tasks"):
        variant_overrides("gate_supervised")
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        variant_overrides("nope")
    assert "mole.num_experts=2" in variant_overrides("gate_supervised", num_tasks=1)  # top-2 needs 2 experts


def test_bad_arguments_fail_with_the_bad_value(capsys):
    for argv, message in (
        (["--variants", "lora_r16", "nope"], "nope"),
        (["--set", "optim.lr"], "KEY=VALUE"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--data", "/no/such/file.jsonl"], "no such file"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--data", "conflict"], "not a built-in set (multitask, conflicting)"),
    ):
        with pytest.raises(SystemExit):
            study._parse(argv)
        assert message in capsys.readouterr().err


def _fake_run(started, gate, fail=None):
    def run(variant, seed):
        started.append((variant, seed))
        if (variant, seed) == fail:
            raise RuntimeError(f"{variant} seed {seed} failed")
        gate(variant, seed)
        return {"variant": variant, "seed": seed, "accuracy": 0.5, "val_lm_loss": 1.0, "active_rank": 16.0,
                "trainable_params": 1, "seconds": 0.0}  # fmt: skip

    return run


def test_run_all_trains_jobs_at_once_and_returns_results_in_order():
    started, order = [], [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    first_two = threading.Barrier(2)  # passes only when the first two runs are running together

    def gate(variant, seed):
        if seed == 0:
            first_two.wait(timeout=10)

    results = run_all(_fake_run(started, gate), order, jobs=2)
    assert [(r["variant"], r["seed"]) for r in results] == order
    assert sorted(started) == sorted(order) and set(started[:2]) == {("a", 0), ("b", 0)}


def test_run_all_stops_starting_runs_after_a_failure():
    started, order = [], [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    with pytest.raises(RuntimeError, match="a seed 0 failed"):
        run_all(_fake_run(started, lambda *_: time.sleep(0.5), fail=("a", 0)), order, jobs=2)
    # the runs already started finish (a worker freed by the failure may have taken the next one); the rest never start
    assert {("a", 0), ("b", 0)} <= set(started) <= {("a", 0), ("b", 0), ("a", 1)}


def _report(loads, task_usage=None):
    return RoutingReport(
        layers=[f"layer{i}" for i in range(len(loads))],
        load=[torch.tensor(v) for v in loads],
        entropy=[0.5] * len(loads),
        task_usage=[torch.tensor(u) for u in task_usage] if task_usage else [],
        task_tokens=torch.tensor([10.0, 10.0]) if task_usage else None,
        task_names=["a", "b"] if task_usage else [],
    )


def test_routing_health_shows_a_collapsed_router():
    even = [0.25, 0.25, 0.25, 0.25]
    collapsed = [0.97, 0.01, 0.01, 0.01]
    health = routing_health(
        _report([even, collapsed], task_usage=[[even, even], [[1, 0, 0, 0], [0.94, 0.02, 0.02, 0.02]]])
    )
    first, second = health["layers"]["layer0"], health["layers"]["layer1"]
    assert first["largest_share"] == 0.25 and first["dead"] == 0 and first["load_entropy"] == pytest.approx(1.0)
    assert second["largest_share"] == pytest.approx(0.97) and second["dead"] == 3  # 0.01 < 1 / (10 * 4)
    assert second["load_entropy"] < 0.2
    assert first["specialisation"] == pytest.approx(0.0, abs=1e-6)
    summary = health["summary"]
    assert summary["collapsed_layers"] == 1 and summary["dead_experts"] == 3 and summary["experts"] == 8
    # dynmole-style weights that do not sum to one are shares of the layer's total
    assert routing_health(_report([[0.3, 0.3]]))["layers"]["layer0"]["share"] == [0.5, 0.5]


def test_routing_sample_covers_every_task_even_when_the_split_is_grouped():
    from molex.evaluation.analysis import _covering

    grouped = [{"input_ids": torch.zeros(4, 3), "task_ids": torch.full((4,), t)} for t in (0, 0, 0, 1, 1, 2, 2, 2)]
    picked = list(_covering(grouped, 3, 8))
    assert [int(b["task_ids"][0]) for b in picked] == [0, 0, 1, 1, 2, 2]
    unlabelled = [{"input_ids": torch.zeros(4, 3)}] * 5
    assert len(list(_covering(unlabelled, 1, 8))) == 2


def _run(variant, seed, acc, loss, health=None):
    return {
        "variant": variant,
        "description": VARIANTS[variant].description,
        "seed": seed,
        "accuracy": acc,
        "per_task": {"a": acc, "b": acc / 2},
        "val_lm_loss": loss,
        "trainable_params": 1000,
        "active_rank": 16.0,
        "train_seconds": 10.0,
        "health": health,
    }


def test_aggregate_pairs_seeds_and_markdown_and_plot_show_every_variant(tmp_path):
    health = routing_health(_report([[0.5, 0.5], [0.95, 0.05]]))
    runs = [
        _run("lora_r16", 0, 0.50, 1.0),
        _run("lora_r16", 1, 0.60, 0.9),
        _run("mola_increasing", 0, 0.55, 0.95, health),
        _run("mola_increasing", 1, 0.70, 0.85, health),
    ]
    agg = aggregate(runs, reference="lora_r16", tasks=["a", "b"])
    mix = agg["mola_increasing"]
    assert mix["accuracy"]["mean"] == pytest.approx(0.625) and mix["accuracy"]["sd"] == pytest.approx(0.1060660, 1e-5)
    assert mix["vs_reference"]["accuracy"]["values"] == pytest.approx([0.05, 0.10])
    assert mix["vs_reference"]["val_lm_loss"]["mean"] == pytest.approx(-0.05)
    assert agg["lora_r16"]["vs_reference"] is None and agg["lora_r16"]["health"] is None
    assert mix["health"]["collapsed_layers"] == 1
    report = {
        "aggregate": agg, "tasks": ["a", "b"], "reference": "lora_r16", "variants": ["lora_r16", "mola_increasing"],
        "seeds": [0, 1], "base": {"accuracy": 0.0, "val_lm_loss": 3.0}, "test_counts": {"a": 40, "b": 40},
        "command": "python -m benchmarks.study", "model": "m", "steps": 5, "tuning": "nothing",
        "machine": "cpu", "wall_minutes": 1.0, "run_minutes": 1.0,
    }  # fmt: skip
    text = markdown(report)
    assert "| `mola_increasing` | 0.00 M | 16.0 | 62.5 ± 10.6 | +7.5 ± 3.5 |" in text
    assert "| `mola_increasing` | 0.0 / 4 | 0.0 | 1.0 / 0.0 | 0.72 / 0.95 |" in text
    assert plot(report, tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_study_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "study"
    report = study.main(["--quick", "--peft-check", "--out", str(out)])
    saved = json.loads((out / "study.json").read_text())
    variants = list(saved["variants"])
    assert len(variants) >= 2 and saved["reference"] in variants
    assert {r["variant"] for r in saved["runs"]} == set(variants) and len(saved["runs"]) == len(variants)
    for run in saved["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and set(run["per_task"]) == set(saved["tasks"])
        assert math.isfinite(run["val_lm_loss"]) and 0 < run["val_lm_loss"] < 20
        assert run["val_lm_loss_source"].startswith("val/lm_loss")  # one validation at the last step
        assert run["trainable_params"] > 0 and run["active_rank"] > 0
        assert (out / "runs" / run["variant"] / "seed0" / "adapter" / "adapter.safetensors").is_file()
        health = run["health"]
        if not VARIANTS[run["variant"]].mixture:
            assert health is None
            continue
        assert set(health) == {"summary"}  # study.json is compact; the run's result.json has every layer
        result = json.loads((out / "runs" / run["variant"] / "seed0" / "result.json").read_text())
        health = result["health"]
        assert 0.0 <= health["summary"]["dead_fraction"] <= 1.0
        for layer in health["layers"].values():
            experts = layer["experts"]
            assert sum(layer["share"]) == pytest.approx(1.0, abs=1e-3) and len(layer["share"]) == experts
            assert 1.0 / experts - 1e-6 <= layer["largest_share"] <= 1.0
            assert 0 <= layer["dead"] < experts
            assert 0.0 <= layer["load_entropy"] <= 1.0 + 1e-6 and 0.0 <= layer["router_entropy"] <= 1.0 + 1e-6
            assert 0.0 <= layer["specialisation"] <= 1.0 + 1e-6
            assert len(layer["task_usage"]) == len(saved["tasks"])
    lora = next(r for r in saved["runs"] if r["variant"] == "lora_r16")
    assert lora["active_rank"] == 16.0
    check = saved["peft_check"]
    assert check["max_abs_logit_change"] > 0 and check["max_abs_logit_diff"] < 1e-4
    assert check["same_predictions"] == 1.0
    text = (out / "study.md").read_text()
    for name in variants:
        row = re.search(rf"^\| `{name}` \| ([\d.]+) M \| ([\d.]+) \| ([\d.]+) \|", text, re.M)
        assert row, name
        assert float(row.group(3)) == pytest.approx(100 * report["aggregate"][name]["accuracy"]["mean"], abs=0.05)
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resuming: every result exists, so nothing trains again and the report is the same
    result = out / "runs" / variants[0] / "seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    again = study.main(["--quick", "--peft-check", "--out", str(out)])
    assert result.stat().st_mtime_ns == stamp
    assert again["aggregate"] == report["aggregate"]


def test_data_names_a_built_in_set_and_training_is_pinned_to_float32():
    args = study._parse(["--data", "conflicting"])
    overrides = study.common_overrides(args)
    assert "data.builtin_set=conflicting" in overrides and "trainer.precision=32-true" in overrides
    cfg = compose_config(overrides)
    assert cfg.data.builtin_set == "conflicting" and cfg.trainer.precision == "32-true"
    assert "trainer.precision=auto" in study.common_overrides(study._parse(["--train-precision", "auto"]))


def test_quick_works_with_a_data_folder(tmp_path):
    rows = [{"instruction": "Echo.", "input": str(i), "output": str(i), "task": "echo"} for i in range(30)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(study.common_overrides(study._parse(["--quick", "--data", str(tmp_path)])))
    assert cfg.data.source == str(tmp_path.resolve()) and cfg.data.max_length == 160


def _fake_train_run(losses):
    def train_run(overrides, run_dir, timeout, threads=None):
        lr = next(float(o.split("=", 1)[1]) for o in reversed(overrides) if o.startswith("optim.lr="))
        assert "eval.after=false" in overrides  # tuning never looks at the test split
        return {"train": {"val/lm_loss": losses[lr], "seconds": 1.0}}

    return train_run


def test_tuning_keeps_the_lowest_validation_loss_and_never_a_diverged_run(tmp_path, monkeypatch):
    from benchmarks import study_tuning

    losses = {1e-3: 1.2, 3e-3: 1.0, 1e-2: float("nan"), 3e-2: 0.5}  # 3e-2 "wins" unless it diverged
    losses[3e-2] = float("inf")
    monkeypatch.setattr(study_tuning, "train_run", _fake_train_run(losses))
    choice = study_tuning.tune_variants(
        ["lora_r16", "lora_r16_tuned"], lambda v: ["seed=0"], out=tmp_path, jobs=1, timeout=10, threads=1
    )
    assert list(choice) == ["lora_r16_tuned"]
    assert choice["lora_r16_tuned"]["chosen"] == 3e-3
    assert choice["lora_r16_tuned"]["losses"] == {"0.001": 1.2, "0.003": 1.0, "0.01": None, "0.03": None}
    # cached: a second call trains nothing
    monkeypatch.setattr(study_tuning, "train_run", None)
    again = study_tuning.tune_variants(
        ["lora_r16_tuned"], lambda v: ["seed=0"], out=tmp_path, jobs=1, timeout=10, threads=1
    )
    assert again == choice


def test_tuning_stops_when_every_value_diverges(tmp_path, monkeypatch):
    from benchmarks import study_tuning

    monkeypatch.setattr(
        study_tuning, "train_run", _fake_train_run(dict.fromkeys((1e-3, 3e-3, 1e-2, 3e-2), float("nan")))
    )
    with pytest.raises(SystemExit, match="every optim.lr .* diverged"):
        study_tuning.tune_variants(["mola_tuned"], lambda v: ["seed=0"], out=tmp_path, jobs=1, timeout=10, threads=1)


def test_a_tuned_variants_seed_0_is_its_chosen_tuning_run_scored_as_molex_train_scores(tmp_path, monkeypatch):
    import dataclasses

    tuned = dataclasses.replace(VARIANTS["lora_r16_tuned"], tune=("optim.lr", (3e-3, 1e-2)))
    monkeypatch.setitem(VARIANTS, "lora_r16_tuned", tuned)
    out = tmp_path / "study"
    argv = ["--quick", "--variants", "lora_r16", "lora_r16_tuned", "--out", str(out)]
    report = study.main(argv)
    chosen = report["lr_tuning"]["lora_r16_tuned"]["chosen"]
    run = next(r for r in report["runs"] if r["variant"] == "lora_r16_tuned")
    assert run["trained_in"] == f"tuning/lora_r16_tuned/lr_{chosen:g}"
    assert not (out / "runs" / "lora_r16_tuned" / "seed0" / "adapter").exists()  # not trained a second time
    assert f"optim.lr={chosen:g}" in run["overrides"] and "eval.after=false" not in run["overrides"]
    # the study's own test scoring gives what molex-train printed for a run it scored itself
    again = study.Study(study._parse(argv))
    lora = next(r for r in report["runs"] if r["variant"] == "lora_r16")
    scores = again._test_scores(again.overrides("lora_r16", 0), 0, out / "runs" / "lora_r16" / "seed0" / "adapter")
    assert scores["per_task"] == lora["per_task"] and scores["accuracy"] == lora["accuracy"]
