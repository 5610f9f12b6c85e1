"""Routing analytics: aggregation against a direct computation, specialisation score, plots."""

from __future__ import annotations

import math

import pytest
import torch

import molex
from molex.evaluation.analysis import RoutingReport, collect_routing, log_routing_report, plot_routing
from tests.helpers.lightning import synthetic_batches
from tests.helpers.models import tiny_llama


def batches(num: int = 8, batch_size: int = 4):
    rows = synthetic_batches(num=num)
    return [{k: torch.stack([r[k] for r in rows[i : i + batch_size]]) for k in rows[0]} for i in range(0, num, 4)]


def injected(router: str = "topk"):
    cfg = molex.MoLEConfig(target_modules=["q_proj", "down_proj"], rank=4, num_experts=4, router=router)
    model = molex.inject(tiny_llama(num_layers=2), cfg)
    for layer in molex.mole_layers(model).values():  # sharpen the gates so loads are far from uniform
        torch.nn.init.normal_(layer.router.gate.weight, std=3.0)
    return model


def test_collect_matches_direct_computation():
    model = injected()
    data = batches()
    report = collect_routing(model, data, task_names=["a", "b", "c"])
    name = "model.layers.1.mlp.down_proj"
    layer = molex.mole_layers(model)[name]
    gates, tasks = [], []
    for batch in data:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].reshape(-1).bool()
        gates.append(layer.last_decision.to_dense(4)[mask])
        tasks.append(batch["task_ids"][:, None].expand_as(batch["input_ids"]).reshape(-1)[mask])
    gate, task = torch.cat(gates), torch.cat(tasks)
    i = report.layers.index(name)
    torch.testing.assert_close(report.load[i], gate.mean(0))
    for t in range(3):
        torch.testing.assert_close(report.task_usage[i][t], gate[task == t].mean(0))
    torch.testing.assert_close(report.task_tokens, torch.bincount(task, minlength=3).float())
    assert all(0.0 <= e <= 1.0 for e in report.entropy)
    assert report.task_names == ["a", "b", "c"]


def test_specialisation_extremes():
    tokens = torch.tensor([10.0, 10.0])
    alike = RoutingReport(["l"], [torch.ones(2) / 2], [1.0], [torch.full((2, 2), 0.5)], tokens, ["x", "y"])
    apart = RoutingReport(["l"], [torch.ones(2) / 2], [0.0], [torch.eye(2)], tokens, ["x", "y"])
    assert alike.specialisation()[0] == pytest.approx(0.0, abs=1e-9)
    assert apart.specialisation()[0] == pytest.approx(1.0)
    assert math.isfinite(apart.to_dict()["layers"]["l"]["specialisation"])


def test_plots_and_logging(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    model = injected("soft")
    report = collect_routing(model, batches(), task_names=["a", "b", "c"])
    paths = plot_routing(report, tmp_path / "plots")
    assert set(paths) == {"expert_load", "router_entropy", "task_expert_usage"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv, tb = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    log_routing_report(report, paths, [csv, tb], step=3)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "routing_final/layers.0.self_attn.q_proj/entropy" in text
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_collect_without_tasks_and_errors():
    model = injected()
    data = [{k: v for k, v in b.items() if k != "task_ids"} for b in batches()]
    report = collect_routing(model, data)
    assert report.task_usage == [] and report.specialisation() == []
    with pytest.raises(ValueError, match="no MoLE layers"):
        collect_routing(tiny_llama(num_layers=1), data)
    with pytest.raises(ValueError, match="no tokens"):
        collect_routing(model, [])


@pytest.mark.parametrize(("router", "options", "active"), [("topk", {"top_k": 2}, 2.0), ("soft", {}, 4.0)])
def test_active_experts_per_token(router, options, active):
    cfg = molex.MoLEConfig(target_modules=["q_proj"], rank=4, num_experts=4, router=router, router_options=options)
    model = molex.inject(tiny_llama(num_layers=2), cfg)
    data = batches()
    report = collect_routing(model, data)
    assert report.active == pytest.approx([active, active])
    assert report.to_dict()["layers"]["model.layers.0.self_attn.q_proj"]["active_experts"] == pytest.approx(active)
    layer = molex.mole_layers(model)["model.layers.0.self_attn.q_proj"]
    model(input_ids=data[0]["input_ids"], attention_mask=data[0]["attention_mask"])
    assert float(layer.routing_stats()["active"]) == pytest.approx(active)


def test_per_task_sampling_covers_every_task_of_grouped_data():
    from molex.evaluation.analysis import _covering

    model = injected()
    rows = sorted(synthetic_batches(num=24), key=lambda r: int(r["task_ids"]))  # grouped: 8 per task, in order
    grouped = [{k: torch.stack([r[k] for r in rows[i : i + 4]]) for k in rows[0]} for i in range(0, 24, 4)]
    report = collect_routing(model, grouped, task_names=["a", "b", "c"], per_task=4)
    assert (report.task_tokens > 0).all()  # max_batches=3 would have seen task "a" alone
    assert len(list(_covering(grouped, 3, 4))) == 3  # one batch per task is enough
    first = collect_routing(model, grouped, task_names=["a", "b", "c"], max_batches=2)
    assert first.task_tokens[1:].sum() == 0
    with pytest.raises(ValueError, match="per_task must be >= 1"):
        collect_routing(model, grouped, per_task=0)
    unlabelled = [{k: v for k, v in b.items() if k != "task_ids"} for b in grouped]
    assert len(list(_covering(unlabelled, 3, 4))) == 3  # 3 tasks x 4 examples, 4 per batch


def test_bf16_routing_agrees_with_float32():
    model = injected()
    full = collect_routing(model, batches())
    half = collect_routing(model, batches(), precision="bf16")
    for a, b in zip(full.load, half.load, strict=True):
        torch.testing.assert_close(a, b, atol=0.08, rtol=0)
