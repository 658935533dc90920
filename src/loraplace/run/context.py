"""What the runs of one process share (:class:`RunContext`): the tokenizer, the base model (loaded
once and reused: adapters are unloaded after each run) and the tokenized data."""

from __future__ import annotations

from typing import Any

import torch
from transformers import set_seed

from loraplace.data import PreparedData
from loraplace.records import RunSpec
from loraplace.run.models import load_config, load_model, load_tokenizer, resolve_model_path, round_linear_weights
from loraplace.run.tasks import Task, get_task, task_of


class RunContext:
    """What runs of one process share: the tokenizer, the base model (loaded once and reused:
    adapters are unloaded after each run) and the tokenized data."""

    def __init__(self, allow_fetch: bool = True):
        self.allow_fetch = allow_fetch
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._data: dict[tuple, Any] = {}
        self.prepared = 0  # data preparations (tokenizations) this context ran itself
        self._tasks: dict[str, str] = {}  # model -> the name of the task its architecture implies

    def tokenizer(self, model: str):

        if model not in self._tokenizers:
            self._tokenizers[model] = load_tokenizer(resolve_model_path(model, self.allow_fetch))
        return self._tokenizers[model]

    def task(self, spec: RunSpec) -> Task:
        """The spec's task record; ``auto`` follows the model's architecture (:func:`loraplace.run.tasks.task_of`)."""
        if spec.task != "auto":
            return get_task(spec.task)
        if spec.model not in self._tasks:
            self._tasks[spec.model] = task_of(load_config(resolve_model_path(spec.model, self.allow_fetch))[0])
        return get_task(self._tasks[spec.model])

    def base_model(self, model: str, device: torch.device, task: Task, num_labels: int | None = None,
                   round_to: torch.dtype | None = None, quantization: str = "none"):
        """The loaded base model with the head of ``task``, shared by the runs (one in memory at a time).

        ``quantization`` (nf4, int8) quantizes its projections with bitsandbytes at load and prepares
        it for LoRA training once (:func:`loraplace.run.quantization.prepare_quantized`); rounding leaves
        the quantized weights alone. The quantization is part of the cache key.

        ``round_to`` (bfloat16 or float16: the run's autocast dtype, else None) rounds the
        frozen linear weights once at load (:func:`loraplace.run.models.round_linear_weights`).
        Training holds those weights in that dtype and writes them back as float32
        (:func:`loraplace.run.training.frozen_weights_as`), which leaves rounded values: rounding them
        at load instead makes every run of the study, the base row included, see the same weights
        (bit for bit, whatever ran before), and changes no result, since autocast rounds them to
        the same values at every matmul. A float32 copy of the weights to restore after each run
        would cost a second model's memory. The rounding dtype is part of the cache key.
        """
        key = (model, str(device), task.name, num_labels, str(round_to), quantization)
        if key not in self._models:
            self._models.clear()  # one base model in memory at a time

            set_seed(0)  # a classification head is initialised at load: the same head for every run
            loaded = load_model(resolve_model_path(model, self.allow_fetch), task.name, num_labels,
                                quantization=quantization, device=device)
            if loaded.config.pad_token_id is None:  # classifiers find the last token by the pad id
                loaded.config.pad_token_id = self.tokenizer(model).pad_token_id
            if round_to is not None:
                round_linear_weights(loaded, round_to)
            self._models[key] = loaded
        return self._models[key]

    def drop_models(self) -> None:
        """Forget the loaded base model (its memory goes once nothing else holds it)."""
        self._models.clear()

    @staticmethod
    def data_key(spec: RunSpec, task: Task) -> tuple:
        """What the tokenized data of ``spec`` depends on (runs with the same key share it)."""
        return (spec.model, spec.dataset, task.name, spec.train.max_length, spec.train.loss_on, spec.data.eval_size,
                spec.data.split_seed, spec.data.max_train_examples, spec.data.validation_size)

    def add_data(self, key: tuple, data: PreparedData) -> None:
        """Use ``data``, prepared elsewhere (the Ray driver), for the runs of ``key``."""
        self._data.setdefault(key, data)

    def has_data(self, key: tuple) -> bool:
        return key in self._data

    def data(self, spec: RunSpec, task: Task) -> PreparedData:
        """The spec's tokenized train and eval splits, prepared by its task (:attr:`Task.prepare`)."""
        key = self.data_key(spec, task)
        if key not in self._data:
            self.prepared += 1
            self._data[key] = task.prepare(
                spec.dataset, self.tokenizer(spec.model), eval_size=spec.data.eval_size,
                max_length=spec.train.max_length, split_seed=spec.data.split_seed, loss_on=spec.train.loss_on,
                max_train_examples=spec.data.max_train_examples, allow_fetch=self.allow_fetch,
                validation_size=spec.data.validation_size)
        return self._data[key]
