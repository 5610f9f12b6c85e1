"""Every bad input a user can give stops with one clear error that names the bad value.

Two tables: ``API_CASES`` (the Python API: configs, injection, the model call, routers, data, models)
and ``CLI_CASES`` (``molex-train``, ``molex-eval``, ``molex-fuse`` run as a user runs them). Each case
gives the expected exception type (or exit status) and the texts its message must contain: the
offending value, and for most the way out.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import molex
from molex.data.datamodule import InstructionDataModule
from molex.data.readers import read_source
from molex.models import load_model
from tests.helpers.encoders import encoder_adapter, encoder_folder
from tests.helpers.inputs import BATCH, IDS, auto, export, injected, latin1, raised
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- helpers
def call(router: str, options: dict[str, Any] | None = None, *, train: bool = False, **kwargs: Any) -> Any:
    """One forward of an injected model with ``kwargs`` (default ``input_ids=IDS``)."""
    model = injected(router, **(options or {}))
    model.train(train)
    kwargs.setdefault("input_ids", IDS)
    return model(**kwargs)


def cfg(**kwargs: Any) -> molex.MoLEConfig:
    return molex.MoLEConfig(**{"target_modules": ["q_proj", "v_proj"], **kwargs})


def jsonl(tmp_path: Path, rows: list[dict[str, Any]], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def no_outputs(tmp_path: Path, output: Any = None, name: str = "train.jsonl") -> Path:
    """A data file whose every ``output`` is ``output`` (null or empty)."""
    rows = [{"instruction": f"Add {i} and {i}.", "output": output, "task": "add"} for i in range(12)]
    return jsonl(tmp_path, rows, name)


# ---------------------------------------------------------------- the Python API
@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Path], Any]  # gets a fresh temporary folder
    error: type[BaseException]
    says: tuple[str, ...]  # texts the message must contain: the offending value first


API_CASES = [
    # MoLEConfig: checked when the config is made, not at inject time or inside torch
    Case("target_modules bad regex", lambda p: cfg(target_modules="q_proj("), ValueError, ("'q_proj('", "regular")),
    Case("exclude_modules bad regex", lambda p: cfg(exclude_modules="layers.[0"), ValueError, ("'layers.[0'", "re.")),
    Case("target_modules empty", lambda p: cfg(target_modules=[]), ValueError, ("target_modules is empty",)),
    Case("target_modules not a name", lambda p: cfg(target_modules=42), TypeError, ("42", "list of module names")),
    Case("alpha negative", lambda p: cfg(alpha=-1.0), ValueError, ("alpha", "-1.0", "> 0")),
    Case("alpha zero", lambda p: cfg(alpha=0), ValueError, ("alpha", "got 0", "> 0")),
    Case("alpha nan", lambda p: cfg(alpha=math.nan), ValueError, ("alpha", "nan")),
    Case("alpha infinite", lambda p: cfg(alpha=math.inf), ValueError, ("alpha", "inf")),
    Case("rank zero", lambda p: cfg(rank=0), ValueError, ("rank", "0")),
    Case("rank fractional", lambda p: cfg(rank=2.5), ValueError, ("rank", "2.5", ">= 1")),
    Case("num_experts zero", lambda p: cfg(num_experts=0), ValueError, ("num_experts", "0")),
    Case("dropout one", lambda p: cfg(dropout=1.0), ValueError, ("dropout", "1.0")),
    Case("dropout nan", lambda p: cfg(dropout=math.nan), ValueError, ("dropout", "nan")),
    Case(
        "kernel_backend misspelt", lambda p: cfg(kernel_backend="grouped_mm"), ValueError, ("'grouped_mm'", "'dense'")
    ),
    Case("router unknown", lambda p: cfg(router="topkk"), ValueError, ("'topkk'", "topk")),
    Case("router option unknown", lambda p: cfg(router_options={"jiter_noise": 0.1}), ValueError, ("jiter_noise",)),
    Case(
        "balance_gamma infinite",
        lambda p: cfg(router_options={"balance": "bias", "balance_gamma": math.inf}),
        ValueError,
        ("balance_gamma", "got inf", "finite"),
    ),
    Case("topk input_norm unknown", lambda p: cfg(router_options={"input_norm": "rms"}), ValueError, ("'rms'", "log")),
    Case(
        "topk temperature zero", lambda p: cfg(router_options={"temperature": 0}), ValueError, ("temperature", "got 0")
    ),
    Case(
        "topk balance_share unknown",
        lambda p: cfg(router_options={"balance_share": "count"}),
        ValueError,
        ("'count'", "weight, slots"),
    ),
    Case(
        "merge_route without molex layers",
        lambda p: molex.merge_route(tiny_llama(num_layers=1), [1.0]),
        ValueError,
        ("no molex layers", "molex.inject", "molex.load_adapter"),
    ),
    Case("top_k on soft router", lambda p: cfg(router="soft", top_k=2), ValueError, ("'soft'", "top_k")),
    Case("top_k zero", lambda p: cfg(top_k=0), ValueError, ("top_k", "0")),
    Case(
        "router option nan",
        lambda p: cfg(router="soft", router_options={"temperature": math.nan}),
        ValueError,
        ("temperature=nan",),
    ),
    Case(
        "from_dict unknown field",
        lambda p: molex.MoLEConfig.from_dict({"target_modules": ["q"], "alhpa": 2}),
        ValueError,
        ("'alhpa'",),
    ),
    # AllocationConfig
    Case(
        "overrides bad regex",
        lambda p: molex.AllocationConfig(overrides={"layers.(": 2}),
        ValueError,
        ("'layers.('", "regular expression"),
    ),
    Case(
        "rank_overrides bad regex",
        lambda p: molex.AllocationConfig(rank_overrides={"[": 4}),
        ValueError,
        ("'['", "rank_overrides"),
    ),
    Case(
        "overrides zero experts",
        lambda p: molex.AllocationConfig(overrides={r"layers\.0\.": 0}),
        ValueError,
        (r"'layers\\.0\\.'", "got 0"),
    ),
    Case(
        "schedule unknown",
        lambda p: molex.AllocationConfig(schedule="mola-increase"),
        ValueError,
        ("'mola-increase'", "mola-increasing"),
    ),
    Case("pattern zero", lambda p: molex.AllocationConfig(pattern=[2, 0]), ValueError, ("[2, 0]",)),
    # schedule="auto": the layer count is known at injection, where a total the bounds cannot meet is refused
    Case(
        "auto total above the default cap",
        lambda p: molex.inject(tiny_llama(2), auto(total_experts=1_000_000)),
        ValueError,
        ("total_experts=1000000", "2 layers", "max_experts=64", "set max_experts=", "between 4 and 128"),
    ),
    Case(
        "auto total above max_experts x layers",
        lambda p: molex.inject(tiny_llama(2), auto(total_experts=20, max_experts=6)),
        ValueError,
        ("total_experts=20", "2 layers", "max_experts=6", "between 4 and 12"),
    ),
    Case(
        "auto total below min_experts x layers",
        lambda p: molex.inject(tiny_llama(2), auto(total_experts=5, min_experts=3)),
        ValueError,
        ("total_experts=5", "2 layers", "min_experts=3", "between 6 and"),
    ),
    Case(
        "auto budget_schedule above max_experts x layers",
        lambda p: molex.inject(tiny_llama(2), auto(budget_schedule="mola-increasing", max_experts=3)),
        ValueError,
        ("the 8 experts of budget_schedule 'mola-increasing'", "2 layers", "max_experts=3", "between 4 and 6"),
    ),
    # inject
    Case(
        "target matches nothing",
        lambda p: molex.inject(tiny_llama(2), cfg(target_modules=["q_prj"])),
        ValueError,
        ("['q_prj']", "q_proj"),
    ),
    Case(
        "target not linear",
        lambda p: molex.inject(tiny_llama(2), cfg(target_modules=["mlp"])),
        TypeError,
        ("'model.layers.0.mlp'", "LlamaMLP"),
    ),
    Case("top_k above experts", lambda p: molex.inject(tiny_llama(2), cfg(top_k=8)), ValueError, ("top_k=8", "4")),
    Case("inject twice", lambda p: molex.inject(injected(), cfg()), ValueError, ("already has MoLE layers", "unload")),
    # the model call: routing inputs are checked in the routing hook, where they enter
    Case(
        "task_ids above experts",
        lambda p: call("gate", {"task_loss_coef": 1.0}, train=True, task_ids=torch.tensor([99, 0])),
        ValueError,
        ("99", "[0, 3]"),
    ),
    Case(
        "task_ids negative",
        lambda p: call("gate", {"task_loss_coef": 1.0}, train=True, task_ids=torch.tensor([-5, 1])),
        ValueError,
        ("-5", "-100"),
    ),
    Case(
        "task_ids [B, S+3]",
        lambda p: call("gate", {"task_loss_coef": 1.0}, train=True, task_ids=torch.zeros(2, 8, dtype=torch.long)),
        ValueError,
        ("(2, 8)", "[2, 5]"),
    ),
    Case(
        "task_ids wrong batch",
        lambda p: call("dlp", {"task_loss_coef": 1.0}, train=True, task_ids=torch.tensor([0, 1, 2])),
        ValueError,
        ("(3,)", "[2]"),
    ),
    Case(
        "task_ids missing",
        lambda p: call("gate", {"task_loss_coef": 1.0}, train=True),
        ValueError,
        ("task_ids", "routing_inputs"),
    ),
    Case(
        "milora prompt_mask all zeros",
        lambda p: call("milora", prompt_mask=torch.zeros(2, 5)),
        ValueError,
        ("prompt_mask", "[0, 1]"),
    ),
    Case(
        "milora prompt_mask short",
        lambda p: call("milora", prompt_mask=torch.ones(2, 3)),
        ValueError,
        ("(2, 3)", "[2, 5]"),
    ),
    Case(
        "dlp prompt_mask all zeros",
        lambda p: call("dlp", prompt_mask=torch.zeros(2, 5, dtype=torch.long)),
        ValueError,
        ("prompt_mask", "[0, 1]"),
    ),
    Case(
        "dlp prompt_mask short", lambda p: call("dlp", prompt_mask=torch.ones(2, 4)), ValueError, ("(2, 4)", "[2, 5]")
    ),
    Case(
        "milora fully padded sequence",
        lambda p: call("milora", attention_mask=torch.tensor([[1] * 5, [0] * 5])),
        ValueError,
        ("attention mask", "[1]"),
    ),
    Case(
        "empty batch [2, 0]",
        lambda p: call("topk", input_ids=torch.zeros(2, 0, dtype=torch.long)),
        ValueError,
        ("(2, 0)", "empty batch"),
    ),
    Case(
        "empty batch [0, 5]",
        lambda p: call("topk", input_ids=torch.zeros(0, 5, dtype=torch.long)),
        ValueError,
        ("(0, 5)", "empty batch"),
    ),
    Case(
        "milora zero-token prompt",
        lambda p: call("milora", input_ids=torch.zeros(1, 0, dtype=torch.long)),
        ValueError,
        ("(1, 0)", "empty batch"),
    ),
    Case(
        "dlp empty batch",
        lambda p: call("dlp", input_ids=torch.zeros(0, 5, dtype=torch.long)),
        ValueError,
        ("(0, 5)", "empty batch"),
    ),
    Case(
        "dlp sentence_embeddings width",
        lambda p: call("dlp", sentence_embeddings=torch.zeros(2, 7)),
        ValueError,
        ("(2, 7)", "[2, 32]"),
    ),
    Case(
        "route_text to topk",
        lambda p: raised(lambda: call("topk", route_text=["a", "b"]), "route_text is ignored"),
        UserWarning,
        ("route_text is ignored", "'topk'", "embedding_source='encoder'"),
    ),
    Case(
        "route_text to dlp on model embeddings",
        lambda p: raised(lambda: call("dlp", {"embedding_source": "model"}, route_text="a"), "route_text is ignored"),
        UserWarning,
        ("route_text is ignored", "'dlp'", "embedding_source='encoder'"),
    ),
    Case(
        "routing input unknown",
        lambda p: molex.routing_inputs(injected(), taskids=1).__enter__(),
        ValueError,
        ("taskids",),
    ),
    # standalone routers
    Case(
        "router input width",
        lambda p: molex.build_router("topk", in_features=16, num_experts=4)(torch.randn(3, 8)),
        ValueError,
        ("(3, 8)", "16"),
    ),
    Case(
        "router input 1-D",
        lambda p: molex.build_router("soft", in_features=16, num_experts=4)(torch.randn(16)),
        ValueError,
        ("(16,)", "[tokens, 16]"),
    ),
    Case(
        "milora router width",
        lambda p: molex.build_router("milora", in_features=16, num_experts=4)(torch.randn(5, 12)),
        ValueError,
        ("(5, 12)", "16"),
    ),
    Case(
        "dlp router no tokens",
        lambda p: molex.build_router("dlp", in_features=16, num_experts=4)(torch.randn(0, 16)),
        ValueError,
        ("(0, 16)", "'dlp'"),
    ),
    Case(
        "router top_k above experts",
        lambda p: molex.build_router("topk", in_features=8, num_experts=4, top_k=5),
        ValueError,
        ("top_k=5", "num_experts=4"),
    ),
    Case(
        "kernel backend unknown",
        lambda p: molex.mole_delta(
            torch.randn(3, 8),
            torch.randn(2, 4, 8),
            torch.randn(2, 4, 8),
            molex.build_router("soft", in_features=8, num_experts=2)(torch.randn(3, 8)),
            backend="fast",
        ),
        ValueError,
        ("'fast'", "dense"),
    ),
    # data
    Case(
        "every output null",
        lambda p: read_source(no_outputs(p, None)),
        ValueError,
        ("train.jsonl", "every one of the 12", "'output'"),
    ),
    Case(
        "every output empty",
        lambda p: read_source(no_outputs(p, "  ")),
        ValueError,
        ("train.jsonl", "null or empty output"),
    ),
    Case(
        "mapped output column missing",
        lambda p: read_source(no_outputs(p, "4"), columns={"output": "answer"}),
        ValueError,
        ("'answer'",),
    ),
    Case("data file unsupported", lambda p: read_source(p / "train.txt"), ValueError, ("train.txt", ".jsonl")),
    Case("data file missing", lambda p: read_source(p / "missing.jsonl"), FileNotFoundError, ("missing.jsonl",)),
    Case("max_length too small", lambda p: InstructionDataModule(max_length=1), ValueError, ("max_length", "1")),
    Case(
        "jsonl not UTF-8",
        lambda p: read_source(latin1(p)),
        ValueError,
        ("train.jsonl", "not valid UTF-8", "byte 0xe9 at offset 20 (line 1)", "re-encode"),
    ),
    Case(
        "json not UTF-8",
        lambda p: read_source(latin1(p, ".json")),
        ValueError,
        ("train.json", "offset 21", "UTF-8"),
    ),
    Case(
        "csv not UTF-8",
        lambda p: read_source(latin1(p, ".csv")),
        ValueError,
        ("train.csv", "offset 40 (line 2)", "UTF-8"),
    ),
    Case(
        "split file not UTF-8",
        lambda p: read_source({"train": jsonl(p, [{"instruction": "a", "output": "b"}]), "test": latin1(p, ".csv")}),
        ValueError,
        ("train.csv", "offset 40", "UTF-8"),
    ),
    Case(
        "data module file not UTF-8",
        lambda p: InstructionDataModule(source=str(latin1(p))).prepare_data(),
        ValueError,
        ("train.jsonl", "offset 20", "UTF-8"),
    ),
    # exports: calibration batches are checked before the model runs on them
    Case(
        "export_single calibration texts",
        lambda p: export(p, ["Add 2 and 3.", "Reverse abc."]),
        TypeError,
        ("calibration_batches[0]", "str", "'Add 2 and 3.'", "{'input_ids'", "return_tensors='pt'"),
    ),
    Case(
        "export_single calibration text after a batch",
        lambda p: export(p, [BATCH, BATCH, "Reverse abc."]),
        TypeError,
        ("calibration_batches[2]", "str", "dict of tensors"),
    ),
    Case(
        "export_single streamed text",
        lambda p: export(p, (b for b in [BATCH, 7])),
        TypeError,
        ("calibration_batches[1]", "int", "dict of tensors"),
    ),
    Case(
        "export_single one batch, not a list",
        lambda p: export(p, BATCH),
        TypeError,
        ("calibration_batches", "dict", "[batch]"),
    ),
    Case(
        "export_single a text, not a list",
        lambda p: export(p, "Add 2 and 3."),
        TypeError,
        ("calibration_batches", "got a str"),
    ),
    Case(
        "export_single input_ids a list",
        lambda p: export(p, [{"input_ids": [[5, 6, 7]]}]),
        TypeError,
        ("calibration_batches[0]['input_ids'] is list", "integer tensor [B, S]", "return_tensors='pt'"),
    ),
    Case(
        "export_single batch without input_ids",
        lambda p: export(p, [{"text": "Add 2 and 3."}]),
        ValueError,
        ("calibration_batches[0]", "no 'input_ids'", "['text']"),
    ),
    Case(
        "export_single attention_mask shape",
        lambda p: export(p, [{"input_ids": IDS, "attention_mask": torch.ones(2, 3)}]),
        ValueError,
        ("calibration_batches[0]['attention_mask']", "(2, 3)", "(2, 5)"),
    ),
    # models and adapters
    Case(
        "model hub name offline",
        lambda p: load_model("someorg/no-such-model"),
        FileNotFoundError,
        ("'someorg/no-such-model'", "could not be reached", "local path"),
    ),
    Case("model path missing", lambda p: load_model(str(p / "no-model")), FileNotFoundError, ("no-model",)),
    Case("dtype unknown", lambda p: load_model("tiny-llama", dtype="float8"), ValueError, ("'float8'", "bf16")),
    Case(
        "adapter folder missing",
        lambda p: molex.load_adapter(tiny_llama(2), p / "gone"),
        FileNotFoundError,
        ("gone", "adapter_config.json"),
    ),
    Case(
        "adapter encoder_path outside it",
        lambda p: molex.load_adapter(tiny_llama(2), encoder_adapter(p / "adapter", encoder_folder(p / "elsewhere"))),
        ValueError,
        ("elsewhere'", "outside the adapter folder", "allow_encoder_path="),
    ),
    Case(
        "inject a (model, tokenizer) pair",
        lambda p: molex.inject(load_model("tiny-llama"), cfg()),
        TypeError,
        ("molex.inject", "tuple", "model, tokenizer = load_model"),
    ),
    Case(
        "save_adapter a model name",
        lambda p: molex.save_adapter("tiny-llama", p / "out"),
        TypeError,
        ("'tiny-llama'", "load_model"),
    ),
    Case(
        "load_adapter base_model= a pair",
        lambda p: molex.load_adapter(base_model=load_model("tiny-llama"), directory=p),
        TypeError,
        ("molex.load_adapter", "unpack"),
    ),
    Case(
        "save without MoLE layers",
        lambda p: molex.save_adapter(tiny_llama(2), p / "out"),
        ValueError,
        ("no MoLE layers", "inject"),
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.name for c in API_CASES])
def test_api_rejects_bad_input_naming_it(case: Case, tmp_path: Path) -> None:
    with pytest.raises(case.error) as info:
        case.run(tmp_path)
    message = str(info.value)
    for text in case.says:
        assert text in message, f"{text!r} not in: {message}"


def test_every_public_function_taking_a_model_checks_it() -> None:
    """Each function of ``molex.__all__`` whose first parameter is the model refuses a non-module at the call."""
    checked = []
    for name in molex.__all__:
        function = getattr(molex, name)
        if not inspect.isfunction(function):
            continue
        first = next(iter(inspect.signature(function).parameters), None)
        if first not in ("model", "base_model"):
            continue
        with pytest.raises(TypeError, match=rf"molex\.{name} needs a model \(torch.nn.Module\), got a tuple"):
            function((tiny_llama(1), None))
        checked.append(name)
    assert len(checked) >= 20, checked


def test_the_tables_cover_enough_cases() -> None:
    assert len(API_CASES) + len(CLI_CASES) >= 40
    assert len({c.name for c in API_CASES}) == len(API_CASES)
    assert {c.prog for c in CLI_CASES} == {"molex-train", "molex-eval", "molex-fuse"}


# ---------------------------------------------------------------- valid neighbours of the bad inputs
def test_valid_routing_inputs_still_pass() -> None:
    # -100 leaves a sequence out of the task loss; [B, S] per-token ids; longer prompt masks are cut
    call("gate", {"task_loss_coef": 1.0}, train=True, task_ids=torch.tensor([-100, 3]))
    call("gate", {"task_loss_coef": 1.0}, train=True, task_ids=torch.full((2, 5), 2))
    call("milora", prompt_mask=torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]))
    # task ids that no router reads are not checked: the data module passes them to every model
    call("topk", task_ids=torch.tensor([99, 7]))
    call("gate", task_ids=torch.tensor([99, 7]))  # task_loss_coef = 0: the gate ignores them


def test_routing_inputs_checked_once_per_generation() -> None:
    model = injected("milora").eval()
    with molex.routing_inputs(model, prompt_mask=torch.ones(2, 5, dtype=torch.long)):
        out = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)  # the [B, S_prompt] mask is checked at prefill, not against the decode steps


def test_route_text_ignored_by_the_router_warns_once() -> None:
    model = injected("topk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=IDS, route_text=["a", "b"])
        model(input_ids=IDS, route_text=["a", "b"])
    messages = [str(w.message) for w in caught if "route_text" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'topk'" in messages[0] and "ignored" in messages[0]


def test_rows_with_an_empty_output_are_dropped_and_counted(tmp_path: Path, caplog) -> None:
    rows = [{"instruction": f"Add {i} and {i}.", "output": str(2 * i) if i % 3 else None} for i in range(9)]
    with caplog.at_level(logging.WARNING, logger="molex.data.readers"):
        splits = read_source(jsonl(tmp_path, rows))
    assert len(splits["train"]) == 6
    assert "dropped 3 of 9 examples" in caplog.text


def test_unreachable_hub_fails_in_seconds(monkeypatch) -> None:
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="'someorg/no-such-model' could not be reached"):
        load_model("someorg/no-such-model")
    assert time.monotonic() - start < 15


# ---------------------------------------------------------------- the three commands
def run_cli(prog: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``prog`` as a user does: the console script next to this interpreter, from a folder outside
    the repository, without PYTHONPATH."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    environ = {k: v for k, v in environ.items() if v is not None}
    script = Path(sys.executable).parent / prog
    assert script.is_file(), f"{prog} is not installed next to {sys.executable}"
    return subprocess.run(
        [str(script), *args, f"hydra.run.dir={cwd / 'run'}"],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass(frozen=True)
class CLICase:
    name: str
    prog: str
    args: Callable[[Path], list[str]]
    says: tuple[str, ...]
    status: int = 2
    env: dict[str, str | None] | None = None
    quick: bool = False  # one case per command runs by default; the others (a command start each) are slow


TINY = ["model=tiny_llama"]
CLI_CASES = [
    CLICase("alpha negative", "molex-train", lambda p: [*TINY, "mole.alpha=-1"], ("alpha", "-1"), quick=True),
    CLICase("alpha zero", "molex-train", lambda p: [*TINY, "mole.alpha=0"], ("alpha", "got 0")),
    CLICase(
        "kernel_backend misspelt",
        "molex-train",
        lambda p: [*TINY, "mole.kernel_backend=gruoped"],
        ("'gruoped'", "'grouped'"),
    ),
    CLICase(
        "target_modules bad regex",
        "molex-train",
        lambda p: [*TINY, "mole.target_modules='q_proj('"],
        ("'q_proj('", "regular expression"),
    ),
    CLICase(
        "no training outputs",
        "molex-train",
        lambda p: [*TINY, "data=jsonl", f"data.source={no_outputs(p)}"],
        ("train.jsonl", "null or empty output"),
    ),
    CLICase(
        "hub model unreachable",
        "molex-train",
        lambda p: ["model.name_or_path=someorg/no-such-model"],
        ("'someorg/no-such-model'", "could not be reached", "local path"),
        env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"},
    ),
    CLICase(
        "model path missing", "molex-train", lambda p: [f"model.name_or_path={p}/no/such/model"], ("no/such/model",)
    ),
    CLICase("no training steps", "molex-train", lambda p: [*TINY, "trainer.max_steps=0"], ("max_steps=0",)),
    CLICase(
        "adapter missing",
        "molex-eval",
        lambda p: [*TINY, f"adapter={p}/gone"],
        ("gone", "adapter_config.json"),
        quick=True,
    ),
    CLICase(
        "eval outputs empty",
        "molex-eval",
        lambda p: [*TINY, "data=jsonl", f"data.source={no_outputs(p, '')}"],
        ("train.jsonl", "null or empty output"),
    ),
    CLICase(
        "adapters folder missing", "molex-fuse", lambda p: [f"adapters={p}/hub"], ("hub", "not a folder"), quick=True
    ),
    CLICase("adapters folder empty", "molex-fuse", lambda p: [f"adapters={p}"], ("no PEFT adapter",)),
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=f"{c.prog}:{c.name}", marks=() if c.quick else pytest.mark.slow) for c in CLI_CASES]
)
def test_cli_rejects_bad_input_naming_it(case: CLICase, tmp_path: Path) -> None:
    proc = run_cli(case.prog, case.args(tmp_path), tmp_path, case.env)
    assert proc.returncode == case.status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith(f"{case.prog}: error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    for text in case.says:
        assert text in error[0], f"{text!r} not in: {error[0]}"
