"""Static merges load in PEFT and equal the expected weights; LoraHub weight search."""

from __future__ import annotations

import pytest
import torch

import molex
from molex.hub.merge import merged_factors
from molex.hub.peft_format import read_peft_adapter
from tests.helpers.hub import make_peft_adapter, one_thread  # noqa: F401 - one_thread is a fixture
from tests.helpers.models import tiny_llama

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(2))
WEIGHTS = [0.8, -0.5]


@pytest.fixture
def adapters(tmp_path):
    make_peft_adapter(tiny_llama, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    make_peft_adapter(tiny_llama, tmp_path / "b", seed=2, r=4, lora_alpha=2, target_modules=["q_proj", "k_proj"])
    return {"a": tmp_path / "a", "b": tmp_path / "b"}


def expected_model(adapters, combination):
    """The base model with the mathematically expected merged update added to its weights (float64)."""
    loaded = [read_peft_adapter(path, name) for name, path in adapters.items()]
    model = tiny_llama().double()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in {m for a in loaded for m in a.modules}:
            parts = [(w, a.modules[name]) for a, w in zip(loaded, WEIGHTS, strict=True) if name in a.modules]
            if combination == "linear":
                A = sum((1 if w * f.scaling >= 0 else -1) * abs(w * f.scaling) ** 0.5 * f.A.double() for w, f in parts)
                B = sum(abs(w * f.scaling) ** 0.5 * f.B.double() for w, f in parts)
                delta = B @ A
            else:
                delta = sum(w * f.scaling * f.B.double() @ f.A.double() for w, f in parts)
            modules[name].weight += delta
    return model


@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_merged_adapter_loads_in_peft_and_matches_expected(tmp_path, adapters, combination):
    from peft import PeftModel

    options = {"svd_rank": 8} if combination == "svd" else {}  # rank 8 >= total rank 8: exact
    out = molex.merge_adapters(adapters, WEIGHTS, combination, tmp_path / "merged", **options)
    merged = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    with torch.no_grad():
        actual = merged(input_ids=IDS).logits
        expected = expected_model(adapters, combination)(input_ids=IDS).logits
    torch.testing.assert_close(actual, expected.float(), atol=1e-5, rtol=1e-5)


def test_svd_truncation_is_best_low_rank_approximation(adapters):
    loaded = [read_peft_adapter(path, name) for name, path in adapters.items()]
    A, B = merged_factors(loaded, WEIGHTS, "svd", svd_rank=2)["model.layers.0.self_attn.q_proj"]
    assert A.shape == (2, 32) and B.shape == (32, 2)
    full = sum(
        w * a.modules["model.layers.0.self_attn.q_proj"].delta_weight() for a, w in zip(loaded, WEIGHTS, strict=True)
    )
    singular = torch.linalg.svdvals(full.double())
    error = torch.linalg.matrix_norm((B @ A).double() - full.double())
    torch.testing.assert_close(error, singular[2:].norm(), atol=1e-5, rtol=1e-4)


def test_merge_refuses_bad_requests(tmp_path, adapters):
    make_peft_adapter(tiny_llama, tmp_path / "r8", seed=3, r=8)
    with pytest.raises(ValueError, match="one rank per module"):
        molex.merge_adapters({"a": adapters["a"], "r8": tmp_path / "r8"}, WEIGHTS, "linear", tmp_path / "m")
    with pytest.raises(ValueError, match="unknown combination 'ties'"):
        molex.merge_adapters(adapters, WEIGHTS, "ties", tmp_path / "m")
    with pytest.raises(ValueError, match="3 weights given for 2 adapters"):
        molex.merge_adapters(adapters, [1, 2, 3], "cat", tmp_path / "m")


def test_lorahub_finds_the_adapter_that_fits(tmp_path, adapters):
    pytest.importorskip("cma")
    from peft import PeftModel

    # the examples are the greedy continuations of base + adapter "a": weight on "a" should win
    teacher = PeftModel.from_pretrained(tiny_llama(), str(adapters["a"])).eval()
    ids = torch.randint(1, 128, (4, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = teacher.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    batch = {"input_ids": labels, "labels": labels, "attention_mask": torch.ones_like(labels)}
    model = tiny_llama()
    result = molex.lorahub_search(model, adapters, [batch], max_evals=40, l1=0.01, out_dir=tmp_path / "hub")
    assert not molex.mole_layers(model)  # restored
    assert result.weights[0] > 0.5 and abs(result.weights[1]) < result.weights[0]
    assert result.objective <= min(result.history) + 1e-6
    merged = PeftModel.from_pretrained(tiny_llama(), str(result.out_dir)).eval()
    with torch.no_grad():
        assert float(merged(**batch).loss) == pytest.approx(result.loss, abs=1e-4)


def test_lorahub_without_cma_says_how_to_install(monkeypatch, adapters):
    import sys

    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(ImportError, match=r"pip install 'molex-lora\[hub\]'"):
        molex.lorahub_search(tiny_llama(), adapters, [{"input_ids": IDS, "labels": IDS}])


def test_merge_never_replaces_its_inputs_or_another_tools_adapter(tmp_path, adapters):
    before = (adapters["a"] / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"out_dir '.*a' is the folder of input adapter 'a'.*choose another out_dir"):
        molex.merge_adapters(adapters, WEIGHTS, "cat", adapters["a"])
    (tmp_path / "link").symlink_to(adapters["b"], target_is_directory=True)
    with pytest.raises(ValueError, match=r"out_dir '.*link' is the folder of input adapter 'b'"):
        molex.merge_adapters(adapters, WEIGHTS, "cat", tmp_path / "link")
    with pytest.raises(ValueError, match="folder of input adapter 'a'"):  # refused before the search runs
        molex.lorahub_search(tiny_llama(), adapters, [{"input_ids": IDS, "labels": IDS}], out_dir=adapters["a"])
    assert (adapters["a"] / "adapter_model.safetensors").read_bytes() == before

    # a PEFT adapter that molex did not write is replaced only with overwrite=True; its other files stay
    make_peft_adapter(tiny_llama, tmp_path / "peft", seed=4)
    with pytest.raises(FileExistsError, match=r"peft holds adapter_config.json, adapter_model.safetensors that molex"):
        molex.merge_adapters(adapters, WEIGHTS, "cat", tmp_path / "peft")
    molex.merge_adapters(adapters, WEIGHTS, "cat", tmp_path / "peft", overwrite=True)
    assert (tmp_path / "peft" / "README.md").is_file()  # written by PEFT, kept
    # molex's own output is replaced without asking; a file path is a clear error
    molex.merge_adapters(adapters, [1.0, 0.0], "cat", tmp_path / "peft")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match=r"folder '.*file' is a file, not a folder"):
        molex.merge_adapters(adapters, WEIGHTS, "cat", tmp_path / "file")
