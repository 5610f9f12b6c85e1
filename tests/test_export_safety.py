"""Exports delete only what molex wrote, refuse models they cannot export, and clean up after a kill.

- ``export_routes`` replaces a previous export's route folders only when their checksum file proves
  molex wrote them: a ``routes.json`` naming ``README.md`` (or a folder outside) deletes nothing.
- ``merge_route`` on a model without molex layers says so, instead of returning the base unchanged.
- ``save_merged`` killed with ``SIGKILL`` mid-write leaves a scratch copy of the model, which the next
  save into that folder removes (and only that one, not a look-alike of the user's).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import molex
from molex.export import save_merged
from molex.export.routes import ROUTE_MARKER, ROUTES_INDEX
from tests.helpers.hub import one_thread  # noqa: F401 - fixture
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = [1, 5, 9, 13, 2]


def molex_model() -> torch.nn.Module:
    model = tiny_llama(num_layers=2)
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=2, rank=2, router="dlp"))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.2)
    return model


def crafted_index(*adapters: str) -> dict:
    return {
        "format": "molex-routes",
        "format_version": 1,
        "routes": {f"r{i}": {"adapter": name} for i, name in enumerate(adapters)},
        "by_name": {},
    }


def test_an_index_naming_other_files_deletes_none_of_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes", encoding="utf-8")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "outside.txt").write_text("elsewhere", encoding="utf-8")
    index = crafted_index("README.md", "data", "../outside.txt", "..", "")
    (out / ROUTES_INDEX).write_text(json.dumps(index), encoding="utf-8")
    exported = molex.export_routes(molex_model(), out, {"w": [1.0, 0.0]})
    assert (out / "README.md").read_text(encoding="utf-8") == "my notes"
    assert (out / "data" / "train.jsonl").read_text(encoding="utf-8") == "{}\n"
    assert (tmp_path / "outside.txt").read_text(encoding="utf-8") == "elsewhere"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", ROUTES_INDEX, "w"]
    assert list(exported.index["routes"]) == ["w"]


def test_a_listed_folder_in_the_way_is_refused_by_name(tmp_path):
    """The index lists ``w``, the new route's own name, but ``w`` is the user's folder: refused, kept."""
    out = tmp_path / "out"
    (out / "w").mkdir(parents=True)
    (out / "w" / "adapter_config.json").write_text('{"mine": true}', encoding="utf-8")
    (out / ROUTES_INDEX).write_text(json.dumps(crafted_index("w")), encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"out holds w that molex did not write.*overwrite=True"):
        molex.export_routes(molex_model(), out, {"w": [1.0, 0.0]})
    assert (out / "w" / "adapter_config.json").read_text(encoding="utf-8") == '{"mine": true}'


def test_route_folders_molex_wrote_are_replaced_and_edited_ones_kept(tmp_path):
    model, out = molex_model(), tmp_path / "out"
    molex.export_routes(model, out, {"w": [1.0, 0.0], "u": [0.5, 0.5]})
    assert json.loads((out / "w" / ROUTE_MARKER).read_text(encoding="utf-8"))["format"] == "molex-route"
    (out / "u" / "notes.txt").write_text("added by hand", encoding="utf-8")  # no longer exactly molex's
    molex.export_routes(model, out, {"v": [0.0, 1.0]})
    assert sorted(p.name for p in out.iterdir()) == [ROUTES_INDEX, "u", "v"]  # w replaced, u kept
    assert (out / "u" / "notes.txt").read_text(encoding="utf-8") == "added by hand"


@pytest.mark.parametrize("route", [[1.0, 0.0], None, [0.5]])
def test_merge_route_without_molex_layers_is_a_clear_error(route):
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no molex layers.*molex.inject.*molex.load_adapter"):
        molex.merge_route(tiny_llama(num_layers=2), route)


def _killed_save(merged: torch.nn.Module, target: Path, after_writing: bool) -> None:
    """A child process runs ``save_merged`` and is killed with SIGKILL inside it: as its scratch folder
    starts, or once ``save_pretrained`` wrote the whole model there (before it is published)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            real = merged.save_pretrained

            def save_pretrained(folder, **kwargs):
                if after_writing:
                    real(folder, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)

            merged.save_pretrained = save_pretrained
            save_merged(merged, target)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and SIGKILL")
def test_next_save_merged_removes_a_killed_saves_scratch(tmp_path):
    from transformers import AutoModelForCausalLM

    merged = molex.merge_route(molex_model(), [1.0, 0.0])
    target = tmp_path / "merged"
    save_merged(merged, target)
    mine = tmp_path / ".merged.molex-save.mine"  # a look-alike molex did not make
    mine.mkdir()
    (mine / "keep.txt").write_text("mine", encoding="utf-8")
    for after_writing in (False, True):  # each killed save also removes the one the previous kill left
        _killed_save(merged, target, after_writing)
        (scratch,) = [p for p in tmp_path.glob(".merged.molex-save.*") if p != mine]
        assert (scratch / "config.json").is_file() == after_writing
    save_merged(merged, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "merged"]
    assert (mine / "keep.txt").read_text(encoding="utf-8") == "mine"
    reloaded = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    with torch.no_grad():
        ids = torch.tensor([IDS])
        assert torch.equal(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)
