"""The LoRA hub: off-the-shelf PEFT LoRA adapters as frozen experts behind a router, static merges and LoraHub.

* :mod:`~molex.hub.peft_format`: read and write PEFT's adapter format (no peft import);
* :mod:`~molex.hub.fuse`: fuse adapters into a model as experts, per-adapter routing analytics;
* :mod:`~molex.hub.train`: train the router of a fused model (the shared :mod:`molex.training` loop);
* :mod:`~molex.hub.merge`: static merges into one plain PEFT adapter;
* :mod:`~molex.export.average`: AdaMix's averaged experts as one plain PEFT adapter;
* :mod:`~molex.hub.lorahub`: LoraHub's gradient-free search of one weight per adapter;
* :mod:`~molex.evaluation.hub`: fit and evaluate a fused hub on task-labelled instruction examples.
"""

from molex.evaluation.hub import evaluate_fused, evaluate_single_adapters, fit_router, prompt_batches, task_batches
from molex.export.average import export_average_adapter
from molex.hub.fuse import (
    AdapterSource,
    adapter_gates,
    adapter_names,
    expert_slots,
    fuse_adapters,
    load_adapters,
    routing_accuracy,
    set_adapter_weights,
)
from molex.hub.lorahub import LoraHubResult, lorahub_search
from molex.hub.merge import COMBINATIONS, merge_adapters, merged_factors
from molex.hub.peft_format import LoraFactors, PeftLoraAdapter, read_peft_adapter, write_peft_adapter
from molex.hub.train import train_router

__all__ = [
    "COMBINATIONS",
    "AdapterSource",
    "LoraFactors",
    "LoraHubResult",
    "PeftLoraAdapter",
    "adapter_gates",
    "adapter_names",
    "evaluate_fused",
    "evaluate_single_adapters",
    "expert_slots",
    "export_average_adapter",
    "fit_router",
    "fuse_adapters",
    "load_adapters",
    "lorahub_search",
    "merge_adapters",
    "merged_factors",
    "prompt_batches",
    "read_peft_adapter",
    "routing_accuracy",
    "set_adapter_weights",
    "task_batches",
    "train_router",
    "write_peft_adapter",
]
