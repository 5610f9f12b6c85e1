"""The variants the study compares, as ``molex-train`` overrides over molex's own defaults.

Every variant keeps the default recipe (model, target modules, rank 8, alpha 16, optimiser, steps) and
changes only what defines it, so differences come from routing and allocation, not from tuning:

* ``lora_r16``: one LoRA of rank 16, the active rank per token of top-2 over rank-8 experts.
* ``lora_r16_tuned``: the same LoRA at the learning rate the study picks from :data:`LR_GRID` on the
  validation LM loss of seed 0 (see :mod:`benchmarks.study_tuning`); ``mola_tuned`` likewise for the default
  mixture, so both sides get the same tuning budget.
* ``rslora_r16``: ``lora_r16`` with rank-stabilised scaling (``alpha / sqrt(r)``, ``mole.use_rslora=true``).
* ``lora_r4``, ``lora_r64``: one LoRA of rank 4 and 64, with ``lora_r16`` the check that one LoRA is
  limited by its rank on a data set (its validation loss keeps falling as the rank grows).
* ``lora_matched``: one LoRA whose rank is chosen so its trainable parameters equal the reference
  mixture's (``mola_increasing``); the rank is computed on the model, see :func:`matched_rank`.
* ``topk_uniform``: top-2 over 5 experts in every layer, about the total of MoLA 2-4-6-8 (150 vs 148 on SmolLM2-135M).
* ``mola_increasing`` (molex's default), ``mola_decreasing``, ``mola_hourglass``: top-2, MoLA schedules.
* ``mola_auto``: top-2, experts per layer decided after a 20-step warm-up (molex's automatic allocation),
  sharing the same total as 2-4-6-8 on the model (``allocation.budget_schedule``).
* ``dynmole``, ``soft``, ``switch``: other token routers over the default 2-4-6-8 allocation.
* ``gate_supervised``: MeteoRA's gate trained with the task labels (one expert per task, top-2),
  the "routing that knows the task" reference.
* ``adamix``: AdaMix, a random expert per token while training, the experts averaged into one LoRA at
  evaluation, 2-4-6-8.
* ``flix_task``: FLix with the task as the one feature (one expert per task, no learned gate).
* ``mtl``: MTL-LoRA, shared A, per-task r x r transform and per-task weights over the B's, 2-4-6-8.
* ``hydra_top2``: top-2 over 2-4-6-8 experts that share one A per layer (HydraLoRA-style).
* ``mola_bias``: ``mola_increasing`` balanced by DeepSeek-V3's loss-free bias instead of the load-balance loss.
* ``mola_v02``: ``mola_increasing`` with molex 0.2's router: the gate on the raw input, and
  ``load_balance_coef=0.01`` averaged over the layers on the share of token slots (the previous default).

LoRA variants keep ``alpha / rank = 2`` (the experts' ``16 / 8``) so every variant starts from the same
update scale.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_VARIANTS",
    "LR_GRID",
    "QUICK_VARIANTS",
    "REFERENCE",
    "VARIANTS",
    "Variant",
    "variant_overrides",
]

#: the variant every other one is compared with (paired by seed)
REFERENCE = "lora_r16"
#: the mixture whose total trainable parameters ``lora_matched`` matches
MATCH_TARGET = "mola_increasing"
#: task-supervised gate: MeteoRA's order of magnitude for the cross-entropy weight
GATE_TASK_LOSS_COEF = 10.0
#: the MoLA schedules have 2, 4, 6, 8 experts over the four quarters of the layers: 5 on average
MOLA_MEAN_EXPERTS = 5
#: the learning rates a ``*_tuned`` variant chooses from (the default, 3e-3, among them)
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)


@dataclass(frozen=True)
class Variant:
    """One configuration of the study.

    Attributes:
        name: short identifier (also the run folder's name).
        description: one line for the tables.
        overrides: ``molex-train`` overrides; ``{rank}`` and ``{alpha}`` are filled for ``lora_matched``
            and ``{num_tasks}`` for ``gate_supervised``.
        mixture: True when a router chooses among several experts (routing health applies).
        tune: ``(override key, candidate values)``: the study trains seed 0 at each value, keeps the one with
            the lowest validation LM loss and runs every seed with it.
    """

    name: str
    description: str
    overrides: tuple[str, ...]
    mixture: bool = True
    tune: tuple[str, tuple[float, ...]] | None = None


_LORA = ("allocation=uniform", "mole.num_experts=1", "router=fixed")

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "lora_r16",
            "one LoRA, rank 16 (= active rank of top-2 x r8)",
            (*_LORA, "mole.rank=16", "mole.alpha=32"),
            False,
        ),
        Variant(
            "lora_r16_tuned",
            "one LoRA, rank 16, learning rate tuned on validation",
            (*_LORA, "mole.rank=16", "mole.alpha=32"),
            False,
            ("optim.lr", LR_GRID),
        ),
        Variant(
            "rslora_r16",
            "one LoRA, rank 16, rank-stabilised scaling (alpha / sqrt r)",
            (*_LORA, "mole.rank=16", "mole.alpha=32", "mole.use_rslora=true"),
            False,
        ),
        Variant("lora_r4", "one LoRA, rank 4", (*_LORA, "mole.rank=4", "mole.alpha=8"), False),
        Variant("lora_r64", "one LoRA, rank 64", (*_LORA, "mole.rank=64", "mole.alpha=128"), False),
        Variant(
            "lora_matched",
            "one LoRA, rank matched to the 2-4-6-8 mixture's total parameters",
            (*_LORA, "mole.rank={rank}", "mole.alpha={alpha}"),
            False,
        ),
        Variant(
            "topk_uniform",
            f"top-2 of {MOLA_MEAN_EXPERTS} experts in every layer (150 on SmolLM2-135M; 2-4-6-8 has 148)",
            ("router=topk", "allocation=uniform", f"mole.num_experts={MOLA_MEAN_EXPERTS}"),
        ),
        Variant(
            "mola_increasing", "top-2, MoLA 2-4-6-8 (molex default)", ("router=topk", "allocation=mola_increasing")
        ),
        Variant(
            "mola_tuned",
            "top-2, MoLA 2-4-6-8 (molex default), learning rate tuned on validation",
            ("router=topk", "allocation=mola_increasing"),
            tune=("optim.lr", LR_GRID),
        ),
        Variant(
            "mola_v02",
            "top-2, MoLA 2-4-6-8, molex 0.2's router (raw input; balance coef 0.01 over the layers, token slots)",
            (
                "router=topk",
                "allocation=mola_increasing",
                "router.options.load_balance_coef=0.01",
                "router.options.balance_share=slots",
                "router.options.input_norm=none",
                "router.options.temperature=1.0",
            ),
        ),
        Variant("mola_decreasing", "top-2, MoLA 8-6-4-2", ("router=topk", "allocation=mola_decreasing")),
        Variant("mola_hourglass", "top-2, MoLA 8-2-2-8", ("router=topk", "allocation=mola_hourglass")),
        Variant(
            "mola_auto",
            "top-2, automatic allocation, same total as 2-4-6-8",
            ("router=topk", "allocation=auto", f"allocation.budget_schedule={MATCH_TARGET.replace('_', '-')}"),
        ),
        Variant(
            "dynmole", "DynMoLE (Tsallis entropy, top-p), 2-4-6-8", ("router=dynmole", "allocation=mola_increasing")
        ),
        Variant("soft", "soft: every expert, softmax weights, 2-4-6-8", ("router=soft", "allocation=mola_increasing")),
        Variant("switch", "switch: top-1, 2-4-6-8", ("router=switch", "allocation=mola_increasing")),
        Variant(
            "gate_supervised",
            "MeteoRA gate, top-2 of one expert per task, trained on task labels",
            (
                "router=gate",
                "allocation=uniform",
                "mole.num_experts={num_tasks}",
                f"router.options.task_loss_coef={GATE_TASK_LOSS_COEF}",
            ),
        ),
        Variant(
            "adamix",
            "AdaMix: random expert per token, averaged LoRA at evaluation, 2-4-6-8",
            ("router=stochastic", "allocation=mola_increasing"),
        ),
        Variant(
            "flix_task",
            "FLix: one expert per task, the example's task feature picks it (no gate)",
            ("router=features", "router.options.features.task={num_tasks}"),
        ),
        Variant(
            "mtl",
            "MTL-LoRA: shared A, per-task r x r transform and weights over the B's, 2-4-6-8",
            ("router=mtl", "allocation=mola_increasing", "router.options.num_tasks={num_tasks}"),
        ),
        Variant(
            "hydra_top2",
            "top-2, 2-4-6-8 experts sharing one A per layer (HydraLoRA-style)",
            ("router=topk", "allocation=mola_increasing", "mole.share_A=true"),
        ),
        Variant(
            "mola_router_lr1",
            "top-2, MoLA 2-4-6-8, routers at the experts' learning rate (the default before router_lr_scale=10)",
            ("router=topk", "allocation=mola_increasing", "optim.router_lr_scale=1"),
        ),
        Variant(
            "mola_bias",
            "top-2, MoLA 2-4-6-8, loss-free bias balancing",
            ("router=topk", "allocation=mola_increasing", "router.options.balance=bias"),
        ),
    )
}

#: the default study: molex's default mixture against one LoRA at its active rank and at its total
#: parameters; 3 seeds of these fit in 75 minutes on 2 CPU cores (one run of SmolLM2-135M costs about
#: 8 minutes there: 60 training steps, the validation loss and 320 test generations). Every other
#: variant runs with ``--variants`` (``all``: every one).
DEFAULT_VARIANTS: tuple[str, ...] = ("lora_r16", "lora_matched", "mola_increasing")
#: ``--quick``: the comparison the study exists for, at its smallest
QUICK_VARIANTS: tuple[str, ...] = ("lora_r16", "mola_increasing")


def variant_overrides(name: str, *, matched_rank: int | None = None, num_tasks: int | None = None) -> list[str]:
    """The variant's ``molex-train`` overrides with its placeholders filled.

    Raises ``ValueError`` naming the variant when it needs a value that was not given.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    needs_rank = any("{rank}" in o for o in variant.overrides)
    if needs_rank and matched_rank is None:
        raise ValueError(f"variant {name!r} needs matched_rank (computed from the model)")
    if any("{num_tasks}" in o for o in variant.overrides) and num_tasks is None:
        raise ValueError(f"variant {name!r} needs num_tasks (read from the data)")
    # top-2 needs two experts even when the data has a single task
    values = {"rank": matched_rank, "alpha": 2 * (matched_rank or 0), "num_tasks": max(num_tasks or 0, 2)}
    return [o.format(**values) if "{" in o else o for o in variant.overrides]
