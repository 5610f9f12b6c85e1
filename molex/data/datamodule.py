"""``InstructionDataModule``: instruction data from the built-in tasks, local files or the hub, as Lightning loaders.

Sources:

* ``"builtin"`` (default): the generated multi-task set of :mod:`molex.data.builtin`.
* a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file (split deterministically into
  train / validation / test with ``seed``), a folder holding ``train.*`` / ``validation.*`` / ``test.*`` files,
  or a dict ``{"train": path, "validation": path, "test": path}``.
* any other name: a hub dataset, loaded with ``datasets.load_dataset`` (the only case that may download).

Everything but ``"builtin"`` is read by :mod:`molex.data.readers`. Columns are mapped to ``instruction`` /
``input`` / ``output`` / ``task`` (and optional ``choices``) with ``columns={"instruction": "question", ...}``;
``input`` and ``task`` may be absent. ``columns={"features": ["task", "lang"]}`` adds
``features = {"task": ids [B], "lang": ids [B]}`` to every batch (see :attr:`feature_values`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from molex.data.builtin import SPLITS, make_builtin_dataset
from molex.data.builtin import builtin_set as tasks_of_set
from molex.data.collate import pack_features, packed_collate, pad_collate
from molex.data.readers import (
    FIELDS,
    FILE_FORMATS,
    TEXT_FIELDS,
    check_columns,
    fingerprint,
    normalise,
    read_source,
    split_name,
)
from molex.data.sampling import ResumableSampler, TrainPositionMixin
from molex.data.templates import encode_example, resolve_template

__all__ = ["FIELDS", "FILE_FORMATS", "InstructionDataModule"]

logger = logging.getLogger(__name__)

_ENCODED_COLUMNS = ("input_ids", "labels", "prompt_mask", "task_id")


class InstructionDataModule(TrainPositionMixin, LightningDataModule):
    """Tokenised instruction data with prompt-masked labels, for causal-LM fine-tuning.

    Batches (``model(**batch)``-ready): ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and
    padding), ``prompt_mask`` (1 on prompt tokens), all ``[B, S]`` and right-padded; ``task_ids [B]`` (index
    into :attr:`task_names`). With ``packing=True`` training rows hold several same-task examples and carry
    ``position_ids [B, S]`` instead of ``attention_mask`` (see :mod:`molex.data.collate`).

    Args:
        tokenizer: a Hugging Face tokenizer; may also be assigned later (``dm.tokenizer = tok``) before ``setup``.
        source: ``"builtin"``, a file, a folder, a ``{split: file}`` dict, or a hub dataset name.
        columns: map from molex field (instruction, input, output, task, choices) to the data's column name.
        template: ``"chat"`` (the tokenizer's chat template, plain if it has none) or ``"plain"``.
        system_prompt: optional system message (chat) or preamble (plain).
        max_length: examples longer than this are cut at the end (counted in :attr:`truncated`); those that
            lose their whole answer are dropped (counted in :attr:`dropped`).
        batch_size / eval_batch_size: training / validation and test batch sizes.
        packing: pack same-task training examples into rows of ``max_length`` tokens.
        num_per_task: built-in training examples per task.
        eval_per_task: built-in validation and test examples per task, where ``val_per_task`` /
            ``test_per_task`` are not given.
        val_per_task / test_per_task: built-in validation / test examples per task (``None``: ``eval_per_task``).
            Tasks with a finite pool give at most the pool's share of a split (at least 40 test examples each).
        builtin_tasks: restrict the built-in set to these task names.
        builtin_set: which built-in set ``source="builtin"`` generates: ``"multitask"`` (8 different skills,
            :mod:`molex.data.builtin`) or ``"conflicting"`` (16 maps of the same word lists,
            :mod:`molex.data.builtin_conflicting`).
        val_fraction / test_fraction: shares carved (seeded) out of ``train`` for splits the source lacks.
        seed: controls built-in generation, splitting and training shuffle order.
        task_names: fixed leading task order (for stable ids across datasets); other tasks found are appended.
        hub_config: configuration name for hub datasets.
    """

    def __init__(
        self,
        *,
        tokenizer: Any = None,
        source: str | Mapping[str, str] = "builtin",
        columns: Mapping[str, Any] | None = None,
        template: str = "chat",
        system_prompt: str | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        packing: bool = False,
        num_per_task: int = 200,
        eval_per_task: int = 25,
        val_per_task: int | None = None,
        test_per_task: int | None = None,
        builtin_tasks: Sequence[str] | None = None,
        builtin_set: str = "multitask",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        task_names: Sequence[str] | None = None,
        hub_config: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and an answer token), got {max_length}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {fraction}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some training data (sum < 1)")
        for name, count in (
            ("num_per_task", num_per_task), ("eval_per_task", eval_per_task),
            ("val_per_task", val_per_task), ("test_per_task", test_per_task),
        ):  # fmt: skip
            if count is not None and count < 0:
                raise ValueError(f"{name} must be >= 0, got {count}")
        check_columns(columns)
        set_tasks = [task.name for task in tasks_of_set(builtin_set)]
        if builtin_tasks is not None:
            unknown = sorted(set(builtin_tasks) - set(set_tasks))
            if unknown:
                raise ValueError(
                    f"builtin_tasks {unknown} are not tasks of the {builtin_set!r} built-in set; "
                    f"choose from {set_tasks}"
                )
        # the hyperparameters go into checkpoints, which resuming reads with torch.load(weights_only=True):
        # plain containers only (Hydra passes OmegaConf lists and dicts)
        source = dict(source) if isinstance(source, Mapping) else source
        columns = dict(columns) if columns is not None else None
        builtin_tasks = list(builtin_tasks) if builtin_tasks is not None else None
        task_names = list(task_names) if task_names is not None else None
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.source = source
        self.columns = dict(columns or {})
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.packing = packing
        self.num_per_task = num_per_task
        self.eval_per_task = eval_per_task
        self.val_per_task = eval_per_task if val_per_task is None else val_per_task
        self.test_per_task = eval_per_task if test_per_task is None else test_per_task
        self.builtin_tasks = builtin_tasks
        self.builtin_set = builtin_set
        self._builtin_order = set_tasks
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.fixed_task_names = list(task_names or [])
        self.hub_config = hub_config
        self.num_workers = num_workers
        self.raw: datasets.DatasetDict | None = None  # normalised text examples per split
        self.datasets: dict[str, datasets.Dataset] = {}  # tokenised examples per split
        self.truncated: dict[str, int] = {}  # examples cut to max_length, per split
        self.dropped: dict[str, int] = {}  # examples whose whole answer was cut, per split
        self._train_rows: list[dict[str, Any]] | None = None  # packed training rows
        self._train_sampler: ResumableSampler | None = None  # the sampler of the last train_dataloader()
        self._resume: dict[str, int] | None = None  # a checkpoint's training position, for the next loader

    # ------------------------------------------------------------------ raw data
    def prepare_data(self) -> None:
        """Load (and for hub datasets download) the raw data once, before ``setup`` runs on every process."""
        self._load_raw()

    def _load_raw(self) -> datasets.DatasetDict:
        if self.raw is None:
            self.raw = datasets.DatasetDict(self._complete_splits(self._read_source()))
        return self.raw

    def _read_source(self) -> dict[str, datasets.Dataset]:
        if self.source != "builtin":
            return read_source(self.source, columns=self.columns, hub_config=self.hub_config)
        sizes = {"train": self.num_per_task, "validation": self.val_per_task, "test": self.test_per_task}
        empty = {field: [] for field in TEXT_FIELDS}
        out = {}
        for split in SPLITS:
            rows = make_builtin_dataset(split, sizes[split], self.seed, self.builtin_tasks, collection=self.builtin_set)
            ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(empty)
            out[split] = normalise(ds, split, self.columns)
        return out

    def _complete_splits(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        """Carve missing validation / test splits out of train, deterministically (seeded)."""
        if "train" not in splits:
            raise ValueError(f"the data has no train split (found {sorted(splits)}); name one 'train'")
        train = splits["train"]
        total = len(train)  # fractions are shares of the whole file, not of what is left after each carve
        for split, fraction in (("test", self.test_fraction), ("validation", self.val_fraction)):
            if split in splits:
                continue
            count = max(round(total * fraction), 1) if fraction > 0 else 0
            if count == 0:
                splits[split] = train.select([])
                continue
            if count >= len(train):
                raise ValueError(
                    f"only {total} training example(s): too few to carve a {split} split of {count}; "
                    f"add data or set {'test' if split == 'test' else 'val'}_fraction=0"
                )
            parts = train.train_test_split(test_size=count, seed=self.seed, shuffle=True, keep_in_memory=True)
            train, splits[split] = parts["train"], parts["test"]
        splits["train"] = train
        return {split: splits[split] for split in SPLITS}

    @property
    def task_names(self) -> list[str]:
        """Task names in id order: the given ``task_names`` first, then the others (built-in order, else sorted)."""
        raw = self._load_raw()
        found = {task for split in raw.values() for task in split["task"]}
        if self.source == "builtin":
            ordered = [t for t in self._builtin_order if t in found]
        else:
            ordered = sorted(found)
        names = list(self.fixed_task_names)
        return names + [t for t in ordered if t not in names]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def feature_names(self) -> list[str]:
        """The data columns named by ``columns={"features": [...]}`` (FLix's feature router), in order."""
        return list(self.columns.get("features") or [])

    @property
    def feature_values(self) -> dict[str, list[str]]:
        """``{feature: its values in id order}`` (sorted, over every split): batches carry the ids."""
        raw = self._load_raw()
        values: dict[str, set[str]] = {name: set() for name in self.feature_names}
        for split in raw.values():
            for row in split["features"] if self.feature_names else ():
                for name, value in zip(self.feature_names, row, strict=True):
                    values[name].add(value)
        return {name: sorted(found) for name, found in values.items()}

    def examples(self, split: str) -> list[dict[str, Any]]:
        """The raw (normalised, untokenised) examples of ``split``."""
        return self._load_raw()[split_name(split)].to_list()

    def test_examples(self) -> list[dict[str, Any]]:
        """Raw test examples, for generation or multiple-choice evaluation."""
        return self.examples("test")

    # ------------------------------------------------------------------ tokenised data
    def setup(self, stage: str | None = None) -> None:
        """Tokenise every split (idempotent): prompt-masked labels, truncation, task ids."""
        if self.datasets:
            return
        if self.tokenizer is None:
            raise ValueError(
                "InstructionDataModule needs a tokenizer: pass tokenizer= or set dm.tokenizer before setup"
            )
        from molex.models import ensure_pad_token

        ensure_pad_token(self.tokenizer)
        template = resolve_template(self.tokenizer, self.template)
        task_ids = {name: i for i, name in enumerate(self.task_names)}
        feature_ids = [{v: i for i, v in enumerate(values)} for values in self.feature_values.values()]
        tokenizer, max_length, system_prompt = self.tokenizer, self.max_length, self.system_prompt

        def encode(example: dict[str, Any]) -> dict[str, Any]:
            enc = encode_example(tokenizer, example, template, max_length, system_prompt)
            encoded = {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "prompt_mask": enc.prompt_mask,
                "task_id": task_ids[example["task"]],
                "truncated": enc.truncated,
                "answer_tokens": enc.answer_tokens,
            }
            if feature_ids:
                encoded["feature_ids"] = [ids[v] for ids, v in zip(feature_ids, example["features"], strict=True)]
            return encoded

        tok_key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), template, max_length, system_prompt)
        for split, raw in self._load_raw().items():
            if len(raw) == 0:  # a split the source does not have (fraction 0)
                self.datasets[split] = datasets.Dataset.from_dict({k: [] for k in _ENCODED_COLUMNS})
                self.truncated[split] = self.dropped[split] = 0
                continue
            encoded = raw.map(
                encode,
                remove_columns=raw.column_names,
                keep_in_memory=True,
                new_fingerprint=fingerprint(
                    "encode", split, raw._fingerprint, tok_key, sorted(task_ids.items()), self.feature_values
                ),
                desc=f"tokenising {split}",
            )
            truncated = int(sum(encoded["truncated"]))
            keep = [i for i, n in enumerate(encoded["answer_tokens"]) if n > 0]
            self.truncated[split], self.dropped[split] = truncated, len(encoded) - len(keep)
            if truncated:
                logger.warning(
                    "%s: truncated %d of %d examples to max_length=%d (%d lost their whole answer and were dropped)",
                    split, truncated, len(encoded), max_length, self.dropped[split],
                )  # fmt: skip
            if len(keep) < len(encoded):
                encoded = encoded.select(keep, keep_in_memory=True)
            self.datasets[split] = encoded.remove_columns(["truncated", "answer_tokens"])
        if len(self.datasets["train"]) == 0:
            raise ValueError(f"no training examples left after truncation to max_length={max_length}; raise it")

    def _require_setup(self, split: str) -> datasets.Dataset:
        if not self.datasets:
            self.setup()
        ds = self.datasets[split]
        if len(ds) == 0:
            raise ValueError(f"the {split} split is empty; give the source a {split} split or a {split} fraction > 0")
        return ds

    def _train_data(self) -> Any:
        """The training rows: the tokenised examples, or with ``packing`` the packed rows."""
        ds = self._require_setup("train")
        if not self.packing:
            return ds
        if self._train_rows is None:
            self._train_rows = pack_features(ds.to_list(), self.max_length)
            logger.info("packed %d training examples into %d rows", len(ds), len(self._train_rows))
        return self._train_rows

    def train_dataloader(self) -> DataLoader:
        data, pad_id = self._train_data(), self.tokenizer.pad_token_id
        if self.packing:
            collate = functools.partial(packed_collate, pad_token_id=pad_id, feature_names=self.feature_names)
        else:
            collate = functools.partial(
                pad_collate, pad_token_id=pad_id, padding_side="right", feature_names=self.feature_names
            )
        sampler = self._train_sampler_for(data)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._require_setup(split)
        collate = functools.partial(
            pad_collate,
            pad_token_id=self.tokenizer.pad_token_id,
            padding_side="right",
            feature_names=self.feature_names,
        )
        return DataLoader(
            ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
