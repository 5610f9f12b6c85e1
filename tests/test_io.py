"""save_adapter / load_adapter: exact round trip, strict and atomic."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import molex
from molex.hub.peft_format import read_peft_adapter
from tests.helpers.models import tiny_gpt2, tiny_llama

CFG = dict(target_modules=["q_proj", "v_proj"], rank=4, top_k=2, allocation={"schedule": "mola-increasing"})


def trained(seed=0):
    model = molex.inject(tiny_llama(), molex.MoLEConfig(**CFG))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in molex.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model):
    ids = torch.arange(1, 15).view(2, 7)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_is_exact(tmp_path):
    model = trained()
    molex.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["mole_config"]["router"]["name"] == "topk" and cfg["molex_version"] == molex.__version__
    assert [layer["num_experts"] for layer in cfg["layers"]][::2] == [2, 4, 6, 8]
    weights = load_file(tmp_path / "adapter.safetensors")
    assert weights and all(("experts" in k or "router" in k) for k in weights)  # MoLE weights only
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind

    loaded = molex.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_gpt2_round_trip(tmp_path):
    model = molex.inject(tiny_gpt2(), molex.MoLEConfig(target_modules=["c_attn"], num_experts=2, top_k=1))
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_()
    molex.save_adapter(model, tmp_path)
    loaded = molex.load_adapter(tiny_gpt2(), tmp_path)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_mismatched_base_model_is_refused_and_left_untouched(tmp_path):
    molex.save_adapter(trained(), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match=r"adapter key '.*q_proj.experts.lora_A' has shape .* expects"):
        molex.load_adapter(wider, tmp_path)
    assert not molex.mole_layers(wider)
    with pytest.raises(ValueError, match="layers in the adapter but not in the model"):
        molex.load_adapter(tiny_llama(num_layers=2), tmp_path)


def test_tampered_adapters_are_refused(tmp_path):
    molex.save_adapter(trained(), tmp_path)
    weights_path = tmp_path / "adapter.safetensors"
    weights = load_file(weights_path)

    # modified weights: checksum mismatch
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match="does not match the checksum"):
        molex.load_adapter(tiny_llama(), tmp_path)

    # missing key (checksum removed, so strict key checking speaks)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("weights_sha256")
    cfg_path.write_text(json.dumps(cfg))
    del weights[key]
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
        molex.load_adapter(tiny_llama(), tmp_path)

    # truncated file
    weights_path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        molex.load_adapter(tiny_llama(), tmp_path)

    # broken JSON / not a molex adapter
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        molex.load_adapter(tiny_llama(), tmp_path)
    cfg_path.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not a molex adapter config"):
        molex.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        molex.load_adapter(tiny_llama(), tmp_path / "missing")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model = trained()
    molex.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter.safetensors").read_bytes()

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("molex.layer.io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        molex.save_adapter(trained(seed=1), tmp_path)
    assert (tmp_path / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_save_refuses_another_tools_adapter_unless_overwrite(tmp_path):
    from tests.helpers.hub import make_peft_adapter

    pytest.importorskip("peft")
    folder = tmp_path / "add"
    make_peft_adapter(tiny_llama, folder, seed=0)
    config = (folder / "adapter_config.json").read_bytes()
    with pytest.raises(
        FileExistsError, match=r"add holds adapter_config.json that molex did not write.*overwrite=True"
    ):
        molex.save_adapter(trained(), folder)
    assert (folder / "adapter_config.json").read_bytes() == config  # still a readable PEFT adapter
    read_peft_adapter(folder)

    # any adapter_config.json molex did not write counts, also one that is not JSON
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FileExistsError, match="other holds adapter_config.json"):
        molex.save_adapter(trained(), tmp_path / "other")

    model = trained()
    molex.save_adapter(model, folder, overwrite=True)
    assert torch.equal(logits(molex.load_adapter(tiny_llama(), folder)), logits(model))
    assert (folder / "README.md").is_file() and (folder / "adapter_model.safetensors").is_file()  # not ours: kept
    molex.save_adapter(trained(seed=1), folder)  # molex's own adapter is replaced without asking


def test_save_to_a_file_or_the_working_directory_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"save_adapter directory '.*weights.bin' is a file, not a folder"):
        molex.save_adapter(trained(), tmp_path / "weights.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"save_adapter directory '.' is the working directory.*dedicated folder"):
        molex.save_adapter(trained(), ".")
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_save_keeps_other_files_and_follows_a_symlinked_folder(tmp_path):
    real = tmp_path / "store" / "adapter"
    molex.save_adapter(trained(), real)
    (real / "notes").mkdir()
    (real / "notes" / "README.md").write_text("kept", encoding="utf-8")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    model = trained(seed=1)
    molex.save_adapter(model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()  # the link still points to the folder, which holds the new adapter
    assert torch.equal(logits(molex.load_adapter(tiny_llama(), real)), logits(model))
    assert (real / "notes" / "README.md").read_text(encoding="utf-8") == "kept"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["adapter"]  # no siblings left behind


def _lightning_checkpoint(path):
    """A real Lightning checkpoint file of a molex-sized adapter, written by Lightning's own checkpoint IO."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    state = {k: v.clone() for k, v in molex.adapter_state_dict(trained()).items()}
    checkpoint = {"state_dict": state, "optimizer_states": [{"state": {}}], "molex": {}, "epoch": 0}
    TorchCheckpointIO().save_checkpoint(checkpoint, path)
    return path


@pytest.mark.parametrize("cut", [0.5, 0.05, 0.0])
def test_a_truncated_checkpoint_is_named_as_such(tmp_path, cut):
    """A .ckpt cut short (torch says only ``OSError: [Errno 22]`` or "central directory") is reported as
    truncated, naming the file, when resuming from it and when it is given to load_adapter."""
    from molex.cli.common import CLIError
    from molex.cli.resume_checks import check_resumable

    whole = _lightning_checkpoint(tmp_path / "whole.ckpt")
    assert check_resumable(str(whole))["molex"] == {}
    data = whole.read_bytes()
    cut_file = tmp_path / "last.ckpt"
    cut_file.write_bytes(data[: int(len(data) * cut)])
    expected = r"last\.ckpt is empty \(0 bytes\), not a checkpoint" if cut == 0 else r"last\.ckpt is truncated"
    with pytest.raises(CLIError, match=rf"ckpt_path='.*{expected}.*checkpoints/last\.ckpt") as caught:
        check_resumable(str(cut_file))
    assert "Errno" not in str(caught.value)
    with pytest.raises(NotADirectoryError, match=r"last\.ckpt is a file, not an adapter folder.*ckpt_path"):
        molex.load_adapter(tiny_llama(), cut_file)


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    from molex.cli.common import CLIError
    from molex.cli.resume_checks import check_resumable

    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint", encoding="utf-8")
    with pytest.raises(CLIError, match=r"notes\.ckpt is not a checkpoint: it does not start like a torch.save"):
        check_resumable(str(notes))
