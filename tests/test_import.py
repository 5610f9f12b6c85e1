"""`import molex` needs only the base dependencies: no GPU, Lightning, Hydra, datasets, peft, triton or lm-eval."""

import subprocess
import sys

HEAVY = [
    "lightning",
    "pytorch_lightning",
    "hydra",
    "omegaconf",
    "datasets",
    "peft",
    "triton",
    "matplotlib",
    "lm_eval",
    "trl",
    "wandb",
    "mlflow",
]


def test_import_molex_without_optional_extras():
    # Block the optional packages outright: importing molex must not touch them.
    code = (
        "import sys\n"
        f"for name in {HEAVY!r}:\n"
        "    sys.modules[name] = None\n"
        "import molex\n"
        "print(molex.__version__, sorted(molex.available_routers()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "topk" in out.stdout


def test_import_molex_leaves_the_quantization_libraries_alone():
    # installed or not, torchao and bitsandbytes load only when a model is quantized
    code = "import sys, molex\nprint(sorted({'torchao', 'bitsandbytes'} & set(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_api():
    import molex

    for name in [
        "MoLEConfig",
        "AllocationConfig",
        "inject",
        "unload",
        "save_adapter",
        "load_adapter",
        "routers",
        "kernels",
        "mole_delta",
        "summary",
        "routing_inputs",
    ]:
        assert hasattr(molex, name), name


def test_lm_eval_missing_names_the_extra():
    # without lm-eval installed, the harness functions say how to install it (molex itself imports fine)
    code = (
        "import sys\n"
        "sys.modules['lm_eval'] = None\n"
        "from molex.evaluation.harness import run_lm_eval\n"
        "from molex.models import load_model\n"
        "model, tok = load_model('tiny-llama')\n"
        "try:\n"
        "    run_lm_eval(model, tok, ['arc_easy'])\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "pip install 'molex-lora[eval]'" in out.stdout


def test_import_molex_initialises_no_cuda():
    # no GPU needed: importing molex must not create a CUDA context (a GPU-less machine would fail there)
    code = "import torch, molex\nprint(torch.cuda.is_initialized())\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
