"""One expert under the ``fixed`` router on a quantized base computes PEFT's LoRA on the same base.

Both call the same quantized layer, so they differ only in float32 rounding of the LoRA branch and of
what follows it. Tolerance on the logits (absolute and relative), per quantization:

==============  ============
quantization    atol / rtol
==============  ============
nf4             1e-5
int8            1e-5
torchao-int8    1e-5
torchao-int4    1e-5
==============  ============
"""

from __future__ import annotations

import warnings

import pytest
import torch

import molex
from molex.models import load_model

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = {"nf4": 1e-5, "int8": 1e-5, "torchao-int8": 1e-5, "torchao-int4": 1e-5}
TARGETS = ["q_proj", "v_proj", "down_proj"]
SIZES = {"hidden_size": 64, "intermediate_size": 128}
RANK, ALPHA = 4, 8.0


@pytest.mark.parametrize("quantization", sorted(TOLERANCE))
def test_one_expert_fixed_router_matches_peft_lora(quantization):
    ours, _ = load_model("tiny-llama", quantization=quantization, config_overrides=SIZES)
    theirs, _ = load_model("tiny-llama", quantization=quantization, config_overrides=SIZES)
    config = molex.MoLEConfig(target_modules=TARGETS, rank=RANK, alpha=ALPHA, num_experts=1, router="fixed")
    molex.inject(ours, config)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao: PEFT warns that it could not re-quantize after a merge
        theirs = peft.get_peft_model(theirs, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in molex.mole_layers(ours).items():
            A = torch.randn(layer.experts.lora_A.shape, generator=generator) * 0.2  # [1, r, in]
            B = torch.randn(layer.experts.lora_B.shape, generator=generator) * 0.2  # [1, r, out]
            layer.experts.lora_A.copy_(A)
            layer.experts.lora_B.copy_(B)
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert type(peft_layer.base_layer) is type(layer.base_layer)  # the same quantized kind
            peft_layer.lora_A["default"].weight.copy_(A[0])  # [r, in]
            peft_layer.lora_B["default"].weight.copy_(B[0].t())  # [out, r]
        x = torch.randint(3, 259, (2, 12), generator=generator)
        expected = theirs(input_ids=x).logits
        actual = ours(input_ids=x).logits
    assert not torch.allclose(actual, molex.unload(ours)(input_ids=x).logits, atol=1e-3)  # the LoRA matters
    tol = TOLERANCE[quantization]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
