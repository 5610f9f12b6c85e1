"""Training step through Lightning: MoLE (top-2 of 8 experts, rank 8) vs PEFT LoRA (rank 16).

Both adapters sit on ``q_proj``, ``v_proj`` and ``down_proj`` of every decoder layer of a random
Llama (no download): the ``tiny`` model (hidden 256, 4 layers, vocab 1024) and a SmolLM2-135M-sized
one (hidden 576, 30 layers, intermediate 1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings).
MoLE trains through :class:`molex.lightning.MoLEModule`; LoRA through a LightningModule with the same
loss and the same AdamW, both under ``lightning.Trainer.fit`` with logger, checkpoints, progress bar
and validation off. A step is measured from ``on_train_batch_start`` to ``on_train_batch_end``
(device-synchronised), which covers forward, backward, optimizer step and Lightning's per-batch
bookkeeping, the same for both variants. Reported: median of ``--steps`` steps after ``--warmup``,
and on CUDA the peak of ``torch.cuda.max_memory_allocated`` from the start of training (weights,
gradients, AdamW moments and activations; reset after Lightning has cast and placed the model).

Run: ``python -m benchmarks.bench_train_step --device cuda --json train.json``
(``--models tiny`` for one model, ``--precision bf16-mixed`` for autocast over fp32 weights).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.harness import environment, write_json

TARGETS = ["q_proj", "v_proj", "down_proj"]

#: random Llama shapes (no download): the benchmarks' tiny model and SmolLM2-135M's architecture
MODELS = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        batch=8,
        seq=128,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        batch=8,
        seq=512,
    ),
}


def build_model(name: str, *, device: str, seq: int | None = None):
    """A random ``LlamaForCausalLM`` of the named shape on ``device`` (fp32; Lightning casts it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    shape = {k: v for k, v in MODELS[name].items() if k not in ("batch", "seq")}
    config = LlamaConfig(**shape, max_position_embeddings=max(seq or 0, 2048), pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def _modules():
    """The two LightningModules, defined here so that importing this file does not import Lightning."""
    import lightning as L

    from molex.lightning import MoLEModule

    class LoRAModule(L.LightningModule):
        """PEFT LoRA trained like MoLEModule: LM loss, AdamW on the trainable parameters."""

        def __init__(self, model: torch.nn.Module, learning_rate: float) -> None:
            super().__init__()
            self.model = model.train()
            self.learning_rate = learning_rate

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss

        def configure_optimizers(self):
            params = [p for p in self.model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.learning_rate)

    class StepTimer(L.Callback):
        """Device-synchronised wall time of every training batch; resets the peak-memory counter at the start."""

        def __init__(self, device: str) -> None:
            self.cuda = device == "cuda"
            self.times: list[float] = []
            self._start = 0.0

        def _sync(self) -> None:
            if self.cuda:
                torch.cuda.synchronize()

        def on_train_start(self, trainer, pl_module) -> None:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync()
            self.times.append(time.perf_counter() - self._start)

    return L, MoLEModule, LoRAModule, StepTimer


def run_variant(
    variant: str, model_name: str, *, device: str, precision: str, steps: int, warmup: int, batch: int, seq: int
) -> dict:
    """Build ``variant`` ('mole' or 'lora') on a fresh random model and train ``warmup + steps`` steps."""
    import molex

    L, MoLEModule, LoRAModule, StepTimer = _modules()
    model = build_model(model_name, device=device, seq=seq)
    if variant == "mole":
        cfg = molex.MoLEConfig(target_modules=TARGETS, rank=8, alpha=16, num_experts=8, router="topk", top_k=2)
        module = MoLEModule(model=model, mole_config=cfg, learning_rate=1e-4, log_routing_every_n_steps=0)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
        module = LoRAModule(peft_model, learning_rate=1e-4)
    else:
        raise ValueError(f"unknown variant {variant!r}; use 'mole' or 'lora'")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    vocab = MODELS[model_name]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * (warmup + steps)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    timer = StepTimer(device)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    timed = timer.times[warmup:]
    if len(timed) != steps:
        raise RuntimeError(f"expected {steps} timed steps after {warmup} warm-up, got {len(timer.times)} in all")
    result = {
        "variant": variant,
        "model": model_name,
        "trainable": trainable,
        "step_s": statistics.median(timed),
        "step_times_s": timed,
        "final_loss": float(trainer.callback_metrics["train/loss"]),
    }
    if device == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if variant == "mole":
        from molex.kernels import resolve_backend
        from molex.routers.base import RoutingDecision

        # what `auto` picks for the q_proj shape of this model at this batch (one representative layer)
        d = MODELS[model_name]["hidden_size"]
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
        x = torch.empty(batch * seq, d, device=device, dtype=dtype)
        a = torch.empty(8, 8, d, device=device, dtype=dtype)
        idx = torch.zeros(batch * seq, 2, dtype=torch.long, device=device)
        result["auto_backend_q_proj"] = resolve_backend("auto", x, a, a, RoutingDecision(idx, idx.float()))
    del trainer, module, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"], choices=sorted(MODELS))
    p.add_argument("--precision", default="bf16-true", choices=["bf16-true", "bf16-mixed", "32-true"])
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, AdamW state)")
    p.add_argument("--batch", type=int, default=None, help="default: the model's (8)")
    p.add_argument("--seq", type=int, default=None, help="default: the model's (tiny 128, smollm2-135m 512)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"need --steps >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    payload: dict = {"env": environment(precision=args.precision), "config": vars(args), "results": [], "ratios": {}}
    for name in args.models:
        batch, seq = args.batch or MODELS[name]["batch"], args.seq or MODELS[name]["seq"]
        runs = {}
        for variant in ("lora", "mole"):
            runs[variant] = run_variant(
                variant,
                name,
                device=args.device,
                precision=args.precision,
                steps=args.steps,
                warmup=args.warmup,
                batch=batch,
                seq=seq,
            )
            runs[variant]["batch"], runs[variant]["seq"] = batch, seq
            payload["results"].append(runs[variant])
            mem = f", peak {runs[variant]['peak_mem_mib']:.0f} MiB" if "peak_mem_mib" in runs[variant] else ""
            print(f"# {name} {variant}: step {runs[variant]['step_s'] * 1e3:.2f} ms{mem}", flush=True)
        ratios = {"step_time_mole_vs_lora": runs["mole"]["step_s"] / runs["lora"]["step_s"]}
        if "peak_mem_mib" in runs["mole"]:
            ratios["peak_mem_mole_vs_lora"] = runs["mole"]["peak_mem_mib"] / runs["lora"]["peak_mem_mib"]
        payload["ratios"][name] = ratios
        print(f"# {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
        if args.json:  # after every model, so that a run cut short still leaves its results
            write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
