"""Study configuration: pydantic models that validate themselves, loaded from YAML and
overridden from the command line (``train.lr=1e-4``, as torchtune does)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplace.errors import LoraplaceError
from loraplace.placement.arms import ARM_SEPARATOR, check_groups, is_groups, parse_arm, parse_budget_reference
from loraplace.placement.scale import DEFAULT_SCALE, ScaleRule
from loraplace.placement.strategies import parse_strategies, parse_strategy, split_strategy_list

TaskChoice = Literal["auto", "causal-lm", "seq2seq", "classification"]
"""What a study trains; ``auto`` follows the architecture (see :mod:`loraplace.run.tasks`)."""

Quantization = Literal["none", "nf4", "int8"]
"""Precision of the frozen base model's projections (see :mod:`loraplace.run.quantization`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank r: adapters add r * (in + out) parameters per module.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha, the numerator of the update scale (see scale).")
    scale: ScaleRule = Field(
        DEFAULT_SCALE, description="The update-scale rule every arm shares (loraplace.placement.scale): "
        "alpha_over_r: alpha / r (PEFT's default); rslora: alpha / sqrt(r) (PEFT's use_rslora); fixed: alpha / "
        "lora.r whatever a module's rank. A module whose rank was chosen for a budget (matched, automatic, EVA "
        "arms) uses the rank of a uniform arm of that budget on the same modules, so each such arm has one scale."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter's input.")
    dropout_masks: Literal["independent", "shared"] = Field(
        "independent", description="independent: one dropout mask per adapter (PEFT's). shared: adapters that "
        "read the same input tensor (q/k/v, gate/up) share one mask: each adapter's own dropout is unchanged, "
        "fewer random numbers and less activation memory."
    )


class TrainSettings(_Strict):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step (per device).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_steps: int = Field(40, ge=1, description="Optimizer steps per run (the training budget).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: str = Field("linear", description="transformers lr scheduler type (linear, cosine, constant, ...).")
    max_length: int = Field(256, ge=8, description="Tokens per example; longer examples are truncated.")
    loss_on: Literal["response", "all"] = Field(
        "response", description="Train and evaluate on response tokens only (default) or on every token."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bfloat16 autocast where the hardware runs it fast (CUDA, CPUs with "
        "AVX512-BF16/AMX), else float32. Adapter weights stay float32 in every mode."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute each decoder layer's activations in backward instead of keeping them "
        "(non-reentrant torch checkpointing): less memory, ~30% more compute; same loss. auto: on only when "
        "the memory plan (loraplace.run.memory_plan) says the run would not fit in the device's free memory "
        "without it; each run records the decision and the estimate."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer for training (dynamic shapes: one graph for every "
        "length). Each arm compiles anew, in its untimed warm-up; see benchmarks/README.md for when it pays."
    )
    eval_batch_size: int = Field(16, ge=1, description="Examples per evaluation batch (no gradients).")
    logging_steps: int = Field(5, ge=1)
    eval_every: int = Field(
        20, ge=0, description="Also evaluate every N optimizer steps for eval-loss curves (0: only at the end)."
    )
    report_to: list[str] = Field(default_factory=list, description="Trainer loggers (tensorboard, wandb, mlflow).")
    save_adapters: bool = Field(
        False, description="Keep each run's trained adapter in runs/<id>/adapter/ (PEFT's save_pretrained: "
        "adapter_model.safetensors and adapter_config.json; PeftModel.from_pretrained loads it).")


class DataSettings(_Strict):
    eval_size: int = Field(100, ge=1, description="Held-out examples for evaluation (fixed for all runs); in a "
                           "study with a validation split, the test split: only reported, never chosen on.")
    validation_size: int = Field(
        0, ge=0, description="Examples held out of the training rows as a validation split, on which every choice "
        "is made (tune.lr); 0: none (two-way split: train and eval). The eval split stays the same rows either way.")
    max_train_examples: int | None = Field(None, ge=1, description="Cap on training examples (after the split).")
    split_seed: int = Field(1234, description="Seed of the train/eval split, fixed across runs and seeds.")


class ImportanceSettings(_Strict):
    """How automatic strategies (``auto[...]``) score the model's modules before the study trains:
    once per study, on the training split, the same batches for every score."""

    batches: int = Field(8, ge=1, description="Training batches the importance scores read.")
    batch_size: int = Field(8, ge=1, description="Examples per scoring batch.")
    max_rank: int = Field(64, ge=1, description="Length of each module's score curve: the highest rank "
                          "an automatic strategy can give one module.")


class LogGrid(_Strict):
    """``n`` learning rates from ``min`` to ``max``, evenly spaced on a log scale (both ends included)."""

    min: float = Field(gt=0)
    max: float = Field(gt=0)
    n: int = Field(ge=2)

    @model_validator(mode="after")
    def _check(self) -> "LogGrid":
        if self.min >= self.max:
            raise ValueError(f"min ({self.min:g}) must be below max ({self.max:g})")
        return self

    def values(self) -> list[float]:
        ratio = (self.max / self.min) ** (1.0 / (self.n - 1))
        return [float(f"{self.min * ratio ** i:.4g}") for i in range(self.n)]


class TuneSettings(_Strict):
    """Learning-rate tuning per arm (``tune.lr``): each arm trains at every candidate rate, the worse
    ones stop early by successive halving (:mod:`loraplace.study.tuning`), the rate with the lowest
    mean validation loss over seeds is the arm's, and the arm is reported by its test (eval) loss at it."""

    lr: list[float] | LogGrid | None = Field(
        None, description="Candidate learning rates: a list ([1e-4, 4e-4, 1.6e-3]) or a log grid "
        "({min: 1e-4, max: 3e-3, n: 4}); None: no tuning (every arm at train.lr).")
    schedule: Literal["halving", "grid"] = Field(
        "halving", description="halving: successive halving (each rung keeps the best 1/eta of the rates by "
        "validation loss, the survivors continue from their saved state); grid: every rate trains to the end.")
    eta: int = Field(3, ge=2, description="Halving rate: each rung keeps ceil(n / eta) rates and trains eta times longer.")
    min_steps: int = Field(1, ge=1, description="No rung ends before this step (Hyperband's minimum resource): a first "
                           "rung of a few steps favours the highest rates, whose early loss drops fastest.")
    untuned: bool = Field(True, description="Also train every arm at train.lr (the report's robustness table sets "
                          "those verdicts beside the tuned ones); false: only the tuning runs (with the default "
                          "halving about 40% fewer steps), and the whole report reads each arm at its tuned rate. "
                          "A resume may turn it on (the untuned runs are added).")

    @field_validator("lr", mode="before")
    @classmethod
    def _parse_lr(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [x for x in v.replace("[", "").replace("]", "").split(",") if x.strip()]
        if isinstance(v, dict):
            try:
                return LogGrid.model_validate(v)
            except ValidationError as e:
                raise ValueError(f"a log grid {{min, max, n}}: {_describe(e)}") from None
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("is empty; give at least 2 learning rates, e.g. [1e-4, 4e-4, 1.6e-3]")
            try:
                return [float(x) for x in v]
            except (TypeError, ValueError):
                raise ValueError(f"{list(v)} holds a value that is not a number") from None
        return v

    @field_validator("lr", mode="after")
    @classmethod
    def _check_lr(cls, v: Any) -> Any:
        if isinstance(v, list):
            bad = [x for x in v if not x > 0 or x != x or x == float("inf")]
            if bad:
                raise ValueError(f"learning rates must be positive and finite, got {bad[0]:g}")
            if len(v) < 2:
                raise ValueError(f"{v} has one rate; tuning needs at least 2")
            if len(set(v)) != len(v):
                raise ValueError(f"{v} repeats a rate")
            return sorted(v)
        return v

    def rates(self) -> list[float]:
        """The candidate rates, ascending ([] without tuning)."""
        if self.lr is None:
            return []
        return self.lr.values() if isinstance(self.lr, LogGrid) else list(self.lr)


class ExecutorSettings(_Strict):
    """How the runs are executed: one after another in this process (``local``), or in parallel
    on a Ray cluster (``ray``: one worker per GPU, or per ``cpus_per_run`` CPUs, on every node).
    Not part of what the study is: left out of study.yaml and results.json, so a resume may
    switch executors."""

    kind: Literal["local", "ray"] = Field("local", description="local: this process; ray: workers on a Ray cluster.")
    address: str | None = Field(
        None, description="Ray cluster to join: None starts a local Ray (or uses the one this process started), "
        "'auto' joins the cluster this machine belongs to, 'ray://host:10001' a remote one.")
    gpus_per_run: float | None = Field(
        None, ge=0, description="GPUs per worker; None: 1 when the cluster has GPUs and device is not cpu, else 0.")
    cpus_per_run: float = Field(1.0, gt=0, description="CPUs per worker (on CPU: also its torch threads).")
    workers: int | None = Field(
        None, ge=1, description="Most workers at once; None: as many as the cluster's free resources fit.")
    max_retries: int = Field(
        2, ge=0, description="Times a run is retried on a new worker when its worker process dies (then it is failed).")
    isolate: bool = Field(
        True, description="Each run in a fresh process, so that its memory and speed do not depend on the runs "
        "before it and a run killed by the OS (out of memory) is recorded as failed while the study goes on.")


class StudyConfig(_Strict):
    """One placement study: a model, a dataset, the strategies to compare and how to train them."""

    name: str = Field("quick", description="Study name, used for the output folder.")
    model: str = Field("smollm2-135m-instruct", description="Embedded alias, hub id, local folder or local .gguf "
                       "file (dequantized to float32 once into the cache).")
    dataset: str = Field("alpaca-demo", description="Embedded alias, hub id, or local json/jsonl/csv/parquet file.")
    strategies: list[str] = Field(default_factory=lambda: ["full", "attention", "ffn"], description=(
        "The arms: strategies (full, attention@last:12, auto[score=adam]), each optionally with its budget "
        "reference (ffn~attention); `groups` / `groups~REFERENCE` stands for one arm per role and per third of "
        "the layers (loraplace.placement.groups), expanded on the model before the study is stored."))
    include_base: bool = Field(True, description="Also evaluate the base model without adapters.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="Every strategy runs once per seed.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    importance: ImportanceSettings = Field(default_factory=ImportanceSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    task: TaskChoice = Field(
        "auto", description="What to train: auto follows the architecture (decoder-only: causal-lm; "
        "encoder-decoder such as T5/BART: seq2seq; encoder-only such as BERT: classification)."
    )
    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda or mps; choose a GPU with CUDA_VISIBLE_DEVICES.")
    quantization: Quantization = Field(
        "none", description="Precision of the frozen base model: none (float32 as loaded); nf4: 4-bit NormalFloat "
        "with double quantisation and bfloat16 compute (QLoRA, arXiv:2305.14314); int8: LLM.int8() "
        "(arXiv:2208.07339). Adapters train in float32 either way; nf4 and int8 need bitsandbytes "
        "(pip install 'loraplace[quant]').",
    )
    output: str | None = Field(None, description="Output folder; default: a new folder under ./runs/.")
    decided: dict[str, Any] = Field(
        default_factory=dict, description="Settings loraplace decided once for every arm of the study, with the "
        "reason (gradient_checkpointing under auto); written to study.yaml, kept on resume, not set by hand.")
    executor: ExecutorSettings = Field(
        default_factory=ExecutorSettings, exclude=True,
        description="How the runs execute (not stored with the study: a resume may change it).")
    match_budget: str | int | None = Field(
        None, description="Also run every strategy with ranks chosen to train as many parameters as this "
        "reference strategy (e.g. full) or parameter count (e.g. 6291456 or 6.3M); matched arms run beside "
        "the unmatched ones as STRATEGY~REFERENCE.",
    )

    @field_validator("strategies", mode="before")
    @classmethod
    def _split_strategies(cls, v: Any) -> Any:

        # Commas inside a strategy (qv@0,3,5 or [r=8,alpha=16]) do not separate strategies.
        return split_strategy_list(v) if isinstance(v, str) else v

    @field_validator("match_budget", mode="before")
    @classmethod
    def _check_budget(cls, v: Any) -> Any:

        return None if v is None or v == "" else parse_budget_reference(v)

    @field_validator("seeds", mode="before")
    @classmethod
    def _split_seeds(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [int(s) for s in v.split(",") if s.strip()]
        return [v] if isinstance(v, int) else v

    @model_validator(mode="after")
    def _check(self) -> "StudyConfig":

        if not self.strategies:
            raise ValueError("strategies is empty; e.g. strategies: [full, attention, ffn]")
        concrete = [s for s in self.strategies if not is_groups(s)]
        for spec in self.strategies:  # an entry may name its budget reference: ffn~attention
            if is_groups(spec):
                check_groups(spec)  # expanded on the model (loraplace.placement.groups)
            else:
                parse_arm(spec)
        # unknown or duplicate names fail here, with the list of known ones
        plain = [s for s in concrete if ARM_SEPARATOR not in s]
        if plain:
            parse_strategies(plain)
        parsed = [parse_strategy(s) for s in concrete if ARM_SEPARATOR not in s]
        fixed = [s.name for s in parsed if s.has_fixed_ranks]
        if self.match_budget is not None and fixed:
            raise ValueError(
                f"match_budget={self.match_budget} needs a free rank, but {', '.join(fixed)} sets r= on every term; "
                "drop r= from one term of each, or leave match_budget out"
            )
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty list without repeats, got {self.seeds}")
        if self.tune.lr is not None and self.data.validation_size == 0:
            raise ValueError("tune.lr chooses each arm's rate on a validation split, and data.validation_size is 0; "
                             "set data.validation_size (e.g. 100)")
        if self.train.compile and self.lora.dropout_masks == "shared":
            raise ValueError("lora.dropout_masks=shared cannot be compiled (its mask cache is Python state); "
                             "use train.compile=false or lora.dropout_masks=independent")
        return self


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        where = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        else:
            parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LoraplaceError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; the value is parsed as YAML, except the strategy
    list: ``strategies=[auto[score=adam]~attention, full]`` (or without the outer brackets) is split
    at its top-level commas as ``--strategies`` is, since a strategy's own ``[...]`` is not YAML."""
    if "=" not in text:
        raise LoraplaceError(f"override {text!r} is not KEY=VALUE (e.g. train.lr=1e-4 or lora.r=8)")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if key == "strategies":
        inner = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        return key, [item.strip("'\"") for item in split_strategy_list(inner)]
    try:
        return key, yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        first = (str(e).strip().splitlines() or ["not YAML"])[0]
        raise LoraplaceError(f"override {text!r}: the value is not valid YAML ({first})") from None


def _basename(source: str) -> str:
    """``Qwen/Qwen2.5-0.5B`` -> ``Qwen2.5-0.5B``; ``./data/chats.jsonl`` -> ``chats``."""
    name = source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for ext in (".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml", ".txt", ".gguf"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def study_name_for(model: str, dataset: str) -> str:
    """A study name from what it runs: ``<model-basename>-<dataset-basename>``, reduced to
    characters that are safe in folder names (``tiny-llama-alpaca``)."""
    raw = f"{_basename(model)}-{_basename(dataset)}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")
    return re.sub(r"-{2,}", "-", name)[:80] or "study"


def load_study(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """A validated study config from a YAML file (or the defaults) plus dotted-key overrides.

    When the overrides set ``model`` or ``dataset`` but not ``name``, the study is named after what
    it runs (:func:`study_name_for`), not after the file or the default (``quick``).

    Raises:
        LoraplaceError: missing file, invalid YAML, unknown key or invalid value (named).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LoraplaceError(f"study file {str(path)!r} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise LoraplaceError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise LoraplaceError(f"{path} must hold a mapping of study keys, got {type(loaded).__name__}")
        data = loaded or {}
    given = {key for key, value in (overrides or {}).items() if value is not None}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    if given & {"model", "dataset"} and "name" not in given:
        # The study file's (or the default) name described its own model and data, not these.
        defaults = StudyConfig.model_fields
        data["name"] = study_name_for(str(data.get("model", defaults["model"].default)),
                                      str(data.get("dataset", defaults["dataset"].default)))
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        source = f"{path}: " if path else ""
        raise LoraplaceError(f"{source}{_describe(e)}") from None
    except LoraplaceError as e:
        raise LoraplaceError(f"{path}: {e}" if path else str(e)) from None
