"""Nothing about quantization prints unless a quantized base is asked for, even with ``molex[quant]`` installed.

``transformers`` imports torchao with its modeling code whenever torchao is installed, and torchao then
announces extensions that do not load and Enum registrations torch deprecated. ``import molex``, loading
a model and a plain ``molex-train`` run must print none of it; molex's own log lines are what may print.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from tests.helpers.cli import ROOT, SMOKE, run_cli

#: a line some library printed: a warning, a deprecation, torchao, or torch's own log format (``W1207 ...``)
NOISE = re.compile(r"torchao|failed to load|warning|deprecat|\.py:\d+: |^[WE]\d{4} ", re.IGNORECASE)
#: molex's own log lines, as Hydra's job logging formats them
MOLEX_LOG = re.compile(r"^\[[^]]+\]\[molex(\.\w+)*\]\[")


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if NOISE.search(line) and not MOLEX_LOG.match(line)]


def test_import_and_model_load_print_nothing():
    # loading a model imports transformers' modeling code, and with it torchao when that is installed
    code = "import molex\nfrom molex.models import load_model\nload_model('tiny-llama')\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240, check=True
    )
    assert proc.stdout == "" and proc.stderr == ""


def test_plain_training_run_prints_no_foreign_warnings(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "molex.cli.train",
        *SMOKE,
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run}",
        env={"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert _noise(proc.stdout) == [] and _noise(proc.stderr) == []


def test_only_the_import_notices_are_dropped(caplog):
    import molex.quant  # noqa: F401 - installs the filters
    from molex.quant.quiet import suppressed

    notice = "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library: /x/torchao/_C_mxfp8.so"
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning(notice)
        logging.getLogger("torchao").warning("int4 weight-only needs groups of 32")
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'X'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
        )
    assert [r.getMessage() for r in caplog.records] == ["int4 weight-only needs groups of 32"]
    assert notice in suppressed()


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_its_per_call_warning_prints_once(caplog):
    import molex.quant  # noqa: F401 - installs the filters
    from molex.quant.quiet import suppressed

    hub = "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository ... could not verify"
    cast = "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization"
    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(hub)
        for _ in range(5):
            logging.getLogger("bitsandbytes.autograd._functions").warning(cast)
        logging.getLogger("bitsandbytes.autograd._functions").warning("a different bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records]
    # the first cast warning of the process prints (an earlier test may have had it), never a second one
    assert messages.count(cast) <= 1 and messages[-1] == "a different bitsandbytes warning" and hub not in messages
    assert hub in suppressed() and suppressed().count(cast) >= 4
