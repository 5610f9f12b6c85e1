"""``FullyShardedStrategy``: FSDP2 training of a MoLE model through Lightning, on GPUs or CPUs.

Lightning's ``FSDPStrategy`` (FSDP1) refuses any accelerator but CUDA ("The strategy `fsdp` requires a GPU
accelerator"). Its ``ModelParallelStrategy`` runs FSDP2 (``fully_shard``) on any device, NCCL on GPUs and
gloo on CPUs, and applies the sharding in the module's ``configure_model``
(:meth:`molex.lightning.MoLEModule.configure_model` calls :func:`molex.lightning.sharding.shard_model`).
This subclass fixes it to pure data parallelism and keeps molex's checkpoints:

* the mesh is one data-parallel dimension over every process (no tensor parallelism);
* a checkpoint is ONE file written by rank 0 through the trainer's ``CheckpointIO`` (molex's
  crash-safe :class:`~molex.lightning.checkpoint_io.AtomicCheckpointIO` under ``molex-train``), holding only
  the expert and router tensors and the optimizer state: the frozen base is never gathered for a
  checkpoint (``ignore_frozen_params``), so saving costs the adapter's size, not the model's;
* loading such a file hands the adapter keys back to ``on_load_checkpoint``, which checks them
  against the model as it does without sharding.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

__all__ = ["FullyShardedStrategy"]


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes, with molex's single-file adapter checkpoints.

    Args:
        process_group_backend: ``None`` picks NCCL on CUDA devices and gloo on CPUs.
        timeout: how long a collective waits for the other ranks.
    """

    strategy_name = "molex_fsdp"

    def __init__(self, *, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(
            data_parallel_size=1,  # set to the world size once the processes exist (`setup_environment`)
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # one data-parallel dimension spanning every process: the mesh `configure_model` shards over
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable parameters and the buffers, gathered in full on rank 0 (empty on the others)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        assert self.model is not None
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        rest = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # the weights are in the model already; their names go on to `on_load_checkpoint`'s key check
        saved = torch.load(self.broadcast(checkpoint_path), map_location="cpu", mmap=True, weights_only=True)
        rest["state_dict"] = dict.fromkeys(saved.get("state_dict", {}))
        return rest
