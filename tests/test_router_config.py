"""The router setting is the router's config dataclass; scope is an Enum; inject leaves the caller's config alone;
adapters saved by molex 0.1 (flat router form) load unchanged."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import molex
from molex.layer.config import flat_router_dict, migrate_mole_dict
from molex.layer.io import FORMAT_VERSION, read_adapter_config
from molex.routers import base as router_base
from molex.routers.base import Router, Scope
from molex.routers.milora import MiLoRAConfig
from molex.routers.soft import SoftConfig
from molex.routers.topk import TopKConfig, TopKRouter
from tests.helpers.models import tiny_llama as shared_tiny_llama

FIXTURES = Path(__file__).parent / "fixtures" / "adapters_v0_2"
TARGETS = ["q_proj", "v_proj"]


def tiny_llama(num_layers: int = 2, seed: int = 0):
    """The model the v0.2 fixtures were saved from (tests/fixtures/adapters_v0_2/make_fixtures.py)."""
    return shared_tiny_llama(num_layers=num_layers, seed=seed)


def test_dataclass_and_name_forms_agree():
    by_name = molex.MoLEConfig(target_modules=TARGETS, router="topk", top_k=1, router_options={"normalize": False})
    by_class = molex.MoLEConfig(target_modules=TARGETS, router=TopKConfig(top_k=1, normalize=False))
    assert by_name == by_class and isinstance(by_name.router, TopKConfig)
    assert by_name.router_name == by_class.router_name == "topk"
    assert by_name.router_class() is TopKRouter and by_name.router_config() is by_name.router
    # top_k / router_options are read-only views of the dataclass: they cannot drift from it
    assert (
        by_class.top_k == 1 and by_class.router_options["normalize"] is False and "top_k" not in by_class.router_options
    )
    with pytest.raises(AttributeError):
        by_class.top_k = 3
    with pytest.raises(TypeError):
        by_class.router_options["normalize"] = True
    by_class.router.top_k = 2
    assert by_class.top_k == 2 and by_class.router_kwargs()["top_k"] == 2
    # dataclasses.replace passes the views back: they agree with the dataclass, so that is accepted
    assert dataclasses.replace(by_class, rank=4).router == by_class.router
    soft = molex.MoLEConfig(target_modules=TARGETS, router=SoftConfig())
    assert soft.top_k is None and soft.router_name == "soft"

    models = []
    for config in (by_name, molex.MoLEConfig(target_modules=TARGETS, router=TopKConfig(top_k=1, normalize=False))):
        torch.manual_seed(3)
        models.append(molex.inject(tiny_llama(), config))
    first, second = (molex.adapter_state_dict(m) for m in models)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "config",
    [
        dict(router="topk", top_k=2, router_options={"jitter_noise": 0.1}),
        dict(router=MiLoRAConfig(top_k=1, normalize=True)),
        dict(router="soft", allocation={"schedule": "mola-increasing"}),
    ],
)
def test_to_dict_from_dict_round_trip(config):
    original = molex.MoLEConfig(target_modules=TARGETS, **config)
    data = original.to_dict()
    assert set(data["router"]) == {"name", "options"} and "top_k" not in data and "router_options" not in data
    json.dumps(data)  # plain data
    again = molex.MoLEConfig.from_dict(json.loads(json.dumps(data)))
    assert again == original and again.to_dict() == data and again.router_name == original.router_name


def test_inject_leaves_the_callers_config_unchanged_and_looks_the_router_up_once(monkeypatch):
    config = molex.MoLEConfig(target_modules=TARGETS, router="topk", top_k=2, num_experts=3)
    before = copy.deepcopy(config)
    calls = []
    lookup = router_base.get_router_class

    def counted(name):
        calls.append(name)
        return lookup(name)

    monkeypatch.setattr(router_base, "get_router_class", counted)
    monkeypatch.setattr("molex.layer.config.get_router_class", counted)
    model = tiny_llama()
    model.config._name_or_path = "tiny/llama"
    molex.inject(model, config)
    assert calls == ["topk"]  # one lookup, for all four layers
    assert config == before and config.to_dict() == before.to_dict() and config.base_model_name_or_path is None
    recorded = molex.get_config(model)
    assert recorded is not config and recorded.base_model_name_or_path == "tiny/llama"
    routers = [layer.router for layer in molex.mole_layers(model).values()]
    assert len(routers) == 4 and all(r.config is recorded.router for r in routers)


def test_scope_is_an_enum_and_string_scopes_are_coerced():
    assert molex.MoLEConfig(target_modules=TARGETS, router=MiLoRAConfig(top_k=1)).router_class().scope is Scope.BLOCK
    assert molex.MoLEConfig(target_modules=TARGETS, router="dlp").router_class().scope is Scope.MODEL
    assert TopKRouter.scope is Scope.LINEAR and str(Scope.BLOCK) == "block"

    class OldStyle(TopKRouter):  # a router written before Scope: the string still works
        scope = "linear"

    assert OldStyle.scope is Scope.LINEAR
    with pytest.raises(ValueError, match=r"scope='layer'.*Scope\.LINEAR"):

        class Misspelt(Router):
            scope = "layer"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(router=TopKConfig(), router_options={"normalize": False}), ("'normalize': False", "TopKConfig(...)")),
        (dict(router=TopKConfig(), top_k=3), ("'top_k': 3", "TopKConfig(...)")),
        (dict(router=SoftConfig(), router_options={"nope": 1}), ("'nope': 1", "SoftConfig(...)")),
        (dict(router="topk", top_k=2, router_options={"top_k": 3}), ("top_k=2", "top_k=3", "disagree")),
        (dict(router="soft", top_k=2), ("'soft'", "no top_k")),
        (dict(router=3), ("router must be", "TopKConfig")),
        (dict(router="nope"), ("unknown router 'nope'",)),
    ],
)
def test_bad_router_settings_fail_with_one_message(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as err:
        molex.MoLEConfig(target_modules=TARGETS, **kwargs)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_a_config_class_no_router_declares_is_refused():
    @dataclasses.dataclass
    class Orphan(router_base.RouterConfig):
        width: int = 1

    with pytest.raises(ValueError, match="Orphan.*no registered router"):
        molex.MoLEConfig(target_modules=TARGETS, router=Orphan())


def test_flat_form_migrates():
    flat = {"target_modules": TARGETS, "router": "milora", "top_k": None, "router_options": {"top_k": 1}}
    migrated = migrate_mole_dict(flat)
    assert migrated["router"] == {"name": "milora", "options": {"top_k": 1}} and "router_options" not in migrated
    assert molex.MoLEConfig.from_dict(flat) == molex.MoLEConfig(target_modules=TARGETS, router=MiLoRAConfig(top_k=1))
    assert flat_router_dict(flat)["router"] == "milora"
    with pytest.raises(ValueError, match="router_options"):
        migrate_mole_dict({**migrated, "router_options": {}})


@pytest.mark.parametrize("name", ["topk", "milora"])
def test_adapters_saved_by_molex_0_1_load(name, tmp_path):
    folder = FIXTURES / name
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert raw["format_version"] == 1 and isinstance(raw["mole_config"]["router"], str)
    assert read_adapter_config(folder)["mole_config"]["router"]["name"] == name
    expected = load_file(folder / "logits.safetensors")
    model = molex.load_adapter(tiny_llama(), folder)
    config = molex.get_config(model)
    assert config.router_name == name and dataclasses.is_dataclass(config.router)
    # options topk gained later keep the values the adapter was trained and routed with
    old_topk = {"input_norm": "none", "temperature": 1.0, "balance_share": "slots"}
    want = {"topk": TopKConfig(top_k=2, normalize=False, jitter_noise=0.05, load_balance_coef=0.02, **old_topk),
            "milora": MiLoRAConfig(top_k=1, normalize=True)}[name]  # fmt: skip
    assert config.router == want
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
    # saved again, it is written in the current format and loads to the same outputs
    molex.save_adapter(model, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["format_version"] == FORMAT_VERSION and saved["mole_config"]["router"]["name"] == name
    with torch.no_grad():
        again = molex.load_adapter(tiny_llama(), tmp_path / "again")(input_ids=expected["input_ids"]).logits
    assert torch.equal(again, logits)


def test_a_format_2_topk_adapter_routes_on_the_raw_input_as_when_it_was_saved(tmp_path):
    model = molex.inject(tiny_llama(), molex.MoLEConfig(target_modules=["q_proj"], num_experts=4, router="topk"))
    assert molex.get_config(model).router.input_norm == "log"  # today's default
    molex.save_adapter(model, tmp_path / "new")
    path = tmp_path / "new" / "adapter_config.json"
    raw = json.loads(path.read_text())
    assert raw["mole_config"]["router"]["options"]["input_norm"] == "log"
    assert read_adapter_config(tmp_path / "new")["mole_config"]["router"]["options"]["input_norm"] == "log"
    for option in ("input_norm", "temperature", "balance_share", "load_balance_coef"):  # as molex 0.2 wrote it
        del raw["mole_config"]["router"]["options"][option]
    raw["format_version"] = 2
    path.write_text(json.dumps(raw))
    options = read_adapter_config(tmp_path / "new")["mole_config"]["router"]["options"]
    saved_as = (options["input_norm"], options["temperature"], options["balance_share"], options["load_balance_coef"])
    assert saved_as == ("none", 1.0, "slots", 0.01)
