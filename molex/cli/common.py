"""What the entry points share: turning a composed Hydra config into molex objects, with clear errors.

This module is the one place that instantiates the config for ``molex-train``, ``molex-eval`` and
``molex-fuse``: the model and tokenizer (:func:`build_model`; with a trained adapter, :func:`build_eval_model`),
the MoLE configuration (:func:`build_mole_config`), the data module (:func:`build_datamodule`) and, for
training, all of them at once with the MoLE layers injected (:func:`build_training`). Every check runs
before any evaluation or training starts, so bad input fails in seconds with one readable line instead of
a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from molex.cli.data_checks import check_routing_data
from molex.cli.errors import CLIError
from molex.core import files
from molex.core.sources import looks_like_path
from molex.layer.config import MoLEConfig

__all__ = [
    "CLIError",
    "TrainingObjects",
    "build_datamodule",
    "build_eval_model",
    "build_model",
    "build_mole_config",
    "build_training",
    "check_cpu_devices",
    "check_generation",
    "check_router_choice",
    "check_sources",
    "check_trainer",
    "instantiate",
    "report_errors",
    "usable_cores",
    "write_json",
]


@dataclasses.dataclass(frozen=True)
class TrainingObjects:
    """Everything ``molex-train`` trains and evaluates, built once by :func:`build_training`.

    ``model`` already holds the MoLE layers of ``mole_config`` (fresh: every ``B`` is zero, so it
    computes exactly what the base model computes until it trains); ``datamodule`` is set up for ``fit``.
    """

    model: Any
    tokenizer: Any
    mole_config: MoLEConfig
    datamodule: Any


#: errors that, escaping a command after its config is composed, are about its input (a file, a shape, an
#: option the library refuses), not a bug in the command: they print as one line like a :class:`CLIError`
_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


def _input_errors() -> tuple[type[BaseException], ...]:
    """:data:`_INPUT_ERRORS` plus Lightning's ``MisconfigurationException`` (not a ``ValueError``) once loaded."""
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    extra = getattr(lightning, "MisconfigurationException", None)
    return _INPUT_ERRORS + ((extra,) if extra is not None else ())


def report_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Print a :class:`CLIError` as ``<prog>: error: ...`` and exit with status 2 (no traceback).

    Any other error about the input (a ``ValueError`` of the library, a file that cannot be read, a missing
    optional package) also prints as that one line, exiting with status 1: a user sees what to fix, not the
    frames it passed through. With ``HYDRA_FULL_ERROR=1`` such an error propagates, so Hydra prints its
    full traceback.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except CLIError as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
                sys.exit(2)
            except _input_errors() as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                text = " ".join(str(err).split()) or type(err).__name__
                print(f"{prog}: error: {text}", file=sys.stderr)
                sys.exit(1)

        return run

    return wrap


def instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with the user's mistake (not Hydra's wrapper) in the error."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise CLIError(f"{what}: {cause}") from None
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        raise CLIError(f"{what}: {err}") from None


def check_router_choice(cfg: DictConfig) -> None:
    """The router is picked by its config group (``router=dlp``), which brings that router's options.

    Overriding ``router.name`` alone would pair one router's name with another's options; under a
    running Hydra app (where the group choice is known) that stops here with the spelling to use.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    choice = HydraConfig.get().runtime.choices.get("router")
    name = cfg.router.name
    if choice is not None and choice != name:
        raise CLIError(
            f"router.name={name} does not match the router group router={choice}; choose the router with "
            f"router={name} (it brings that router's options; change one with router.options.<option>=...)"
        )


def build_mole_config(cfg: DictConfig) -> MoLEConfig:
    """``MoLEConfig`` from the ``mole`` node plus the ``router`` and ``allocation`` groups (validated)."""
    check_router_choice(cfg)
    router_config = instantiate(cfg.router, f"router={cfg.router.name}")
    allocation = instantiate(cfg.allocation, "allocation")
    mole = OmegaConf.to_container(cfg.mole, resolve=True)
    try:
        return MoLEConfig(**mole, router=router_config, allocation=allocation)
    except (ValueError, TypeError) as err:
        raise CLIError(f"mole: {err}") from None


def check_trainer(trainer: DictConfig) -> None:
    """Training must have an end: ``max_steps > 0``, or ``max_steps = -1`` with ``max_epochs > 0``."""
    max_steps = trainer.get("max_steps", -1)
    max_epochs = trainer.get("max_epochs", -1)
    if max_steps == 0 or (max_steps is not None and max_steps < -1):
        raise CLIError(
            f"trainer.max_steps={max_steps}: nothing would train; set trainer.max_steps to a positive number"
        )
    if (max_steps is None or max_steps == -1) and (max_epochs is None or max_epochs <= 0):
        raise CLIError("set trainer.max_steps (or trainer.max_epochs) to a positive number so training has an end")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_cpu_devices(trainer: DictConfig) -> None:
    """On CPU every device is one training process: more processes than cores only thrash (or wait for a
    process group that never forms), silently, for minutes. Refuse that before anything starts."""
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
    if accelerator == "auto":
        import torch

        if torch.cuda.is_available() or torch.backends.mps.is_available():
            return
    elif accelerator != "cpu":
        return
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int):
        return  # "auto" or a list of ids: Lightning picks or checks them
    cores = usable_cores()
    if devices > cores:
        raise CLIError(
            f"trainer.devices={devices} starts {devices} CPU processes but this machine has {cores} CPU "
            f"core{'s' if cores != 1 else ''}: set trainer.devices={cores} or fewer"
        )


def check_generation(node: DictConfig, prefix: str = "") -> None:
    """The evaluation's ``max_new_tokens`` and ``batch_size`` must be counts >= 1: generation refuses
    anything else only once it starts, which for ``molex-train`` is after the whole training run."""
    for key in ("max_new_tokens", "batch_size"):
        value = node.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CLIError(f"{prefix}{key}={value}: give a whole number >= 1")


def check_sources(model: DictConfig, data: DictConfig) -> None:
    """Local model paths and data files must exist (hub names are left to the loaders)."""
    name = str(model.get("name_or_path"))
    from molex.models import MODEL_PRESETS

    if name not in MODEL_PRESETS and looks_like_path(name) and not Path(name).expanduser().exists():
        raise CLIError(
            f"model.name_or_path={name!r} does not exist; give a local model folder or .gguf file, a hub name, "
            f"or a preset ({', '.join(MODEL_PRESETS)})"
        )
    source = data.get("source")
    paths = list(source.values()) if isinstance(source, Mapping) else [source]
    for path in paths:
        text = str(path)
        if text != "builtin" and looks_like_path(text) and not Path(text).expanduser().exists():
            raise CLIError(f"data.source={text!r}: no such file or folder")


def build_model(node: DictConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a ``model`` config node (``molex.models.load_model`` and its options)."""
    from molex.quant import check_quantization

    try:
        check_quantization(node.get("quantization"))
    except ValueError as err:
        raise CLIError(f"model.{err}") from None
    return instantiate(node, "model")


def build_eval_model(node: DictConfig, adapter: str | None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the ``model`` node, with the trained adapter folder ``adapter`` loaded
    onto it (``None``: the base model alone)."""
    import molex

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise CLIError(
            f"adapter={adapter!r} is not an adapter folder (no adapter_config.json); point it at a "
            "run's adapter/ directory"
        )
    model, tokenizer = build_model(node)
    if adapter is not None:
        try:
            model = molex.load_adapter(model, adapter)
        except (ValueError, FileNotFoundError) as err:
            raise CLIError(f"adapter={adapter}: {err}") from None
    return model, tokenizer


def build_datamodule(node: DictConfig, tokenizer: Any, stage: str) -> Any:
    """The ``data`` node's data module, read and tokenised for ``stage`` (``"fit"`` or ``"test"``)."""
    dm = instantiate(node, "data", tokenizer=tokenizer)
    try:
        dm.prepare_data()
        dm.setup(stage)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise CLIError(f"data: {err}") from None
    return dm


def build_training(cfg: DictConfig) -> TrainingObjects:
    """Check the sources, then build the MoLE config, the model (seeded, injected once) and the data module.

    Injection is where missing target modules and router options a layer cannot take (``top_k`` above
    its experts) are found, and the data is where task and feature ids the router cannot route are found
    (:func:`molex.cli.data_checks.check_routing_data`), so those fail here, before any evaluation or training.
    """
    from lightning.fabric.utilities.seed import seed_everything

    import molex

    check_sources(cfg.model, cfg.data)
    mole_config = build_mole_config(cfg)
    model, tokenizer = build_model(cfg.model)
    # the experts' initial A factors come from the global generator: seed it right before injecting
    seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        molex.inject(model, mole_config)
    except (ValueError, TypeError) as err:  # target modules not found, top_k > a layer's experts, ...
        raise CLIError(f"router={cfg.router.name}, allocation: {err}") from None
    datamodule = build_datamodule(cfg.data, tokenizer, "fit")

    check_routing_data(mole_config.router_name, mole_config.router, datamodule, model)
    return TrainingObjects(model=model, tokenizer=tokenizer, mole_config=mole_config, datamodule=datamodule)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A run's JSON report (``metrics.json``, ``routing.json``, ...): keys in reading order, atomically."""
    files.write_json(path, data, sort_keys=False, default=str)
