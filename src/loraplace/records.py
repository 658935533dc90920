"""The records a run is made of: :class:`RunSpec` (everything one run needs) and
:class:`RunResult` (one row of the results table). Plain pydantic models with no torch import,
so that reading stored results (``loraplace report``) stays light."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from loraplace.config import DataSettings, ImportanceSettings, LoraSettings, Quantization, TaskChoice, TrainSettings

RUN_FILES = ("config.json", "modules.json", "train_log.json", "adapter_norms.json", "eval_examples.json",
             "result.json")


class TunePoint(BaseModel):
    """Where a learning-rate tuning run (``kind='tune'``) stands: its candidate rate, the rung it
    trains now (0 = first), the step it stops at (the study's ``train.max_steps`` at the last rung)
    and the step of the checkpoint it continues from (None: from the start), with the time, tokens
    and validation losses of its earlier rungs (see :mod:`loraplace.study.tuning`)."""

    lr: float
    rung: int = 0
    stop_at: int
    resume_step: int | None = None
    before: dict[str, Any] = Field(default_factory=dict, description="train_time_s, train_real_tokens, "
                                   "train_label_tokens and validation_losses of the rungs before this one")


class RunSpec(BaseModel):
    """Everything one run needs. ``kind='base'`` evaluates the model without adapters; ``kind='tune'``
    trains an arm at one candidate learning rate up to a rung of steps (``tune``)."""

    run_id: str
    kind: Literal["lora", "base", "tune"] = "lora"
    strategy: str
    seed: int = 0
    model: str
    dataset: str
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    importance: ImportanceSettings = Field(default_factory=ImportanceSettings)
    device: str = "auto"
    task: TaskChoice = "auto"
    quantization: Quantization = Field("none", description="precision of the frozen base model: none, nf4, int8")
    run_dir: str
    position: int | None = Field(None, description="place of this run in the study's execution order (0 = first)")
    ranks: dict[str, int] | None = Field(
        None, description="automatic arms: the study's stored allocation, exact module name -> rank")
    budget: dict[str, Any] | None = Field(None, description="automatic arms: the allocation's budget record")
    init_state: bytes | None = Field(
        None, exclude=True, repr=False,
        description="arms whose method stores an initial adapter state once per study (EVA's A matrices): "
                    "its safetensors bytes, carried to the worker")
    tune: TunePoint | None = Field(None, description="kind='tune': the candidate rate and the rung")
    resume_files: dict[str, bytes] | None = Field(
        None, exclude=True, repr=False,
        description="kind='tune' after the first rung: the files of the checkpoint it continues from "
                    "(path relative to the checkpoint folder -> bytes), carried to the worker")


class RunResult(BaseModel):
    """One row of the results table. Counts are exact; times in seconds; memory in MiB."""

    run_id: str
    kind: Literal["lora", "base", "tune"]
    strategy: str
    seed: int
    status: Literal["ok", "failed"]
    error: str | None = None
    model: str
    dataset: str
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    init: str | None = Field(None, description="the adapters' initialisation where not PEFT's default (the arm's "
                             "init=: gaussian, pissa, olora, orthogonal); None: Kaiming-uniform A, zero B")
    modules: list[str] = Field(default_factory=list, description="exact names of the adapted modules")
    roles: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    trainable_params: int | None = None
    head_params: int | None = Field(None, description="of trainable_params: a classifier's new head, trained in full")
    total_params: int | None = Field(None, description="base parameters + adapter parameters")
    base_params: int | None = None
    trainable_pct: float | None = Field(None, description="trainable / total * 100")
    ranks: dict[str, list[int]] = Field(default_factory=dict, description="role -> the ranks its modules got")
    match_budget: str | int | None = Field(None, description="budget reference of a matched arm (strategy or count)")
    budget_target: int | None = Field(None, description="parameters the matched arm aimed at")
    budget_deviation_pct: float | None = Field(None, description="(trainable - target) / target * 100; AdaLoRA: "
                                               "(final_params - target) / target * 100")
    final_params: int | None = Field(
        None, description="AdaLoRA: parameters of the final allocation, sum r_i * (in_i + out_i + 1) over the ranks "
        "that survived pruning (trainable_params is what it trained from the start: every module at init_r)")
    # Filled in by the study store (they need other runs): see loraplace.study.store.
    full_lora_params: int | None = None
    params_vs_full_pct: float | None = None
    task: str | None = Field(None, description="causal-lm, seq2seq or classification")
    eval_loss: float | None = None
    eval_accuracy: float | None = Field(None, description="classification: share of eval examples classified right")
    perplexity: float | None = None
    eval_nll_sum: float | None = None
    eval_tokens: int | None = None
    eval_examples: int | None = None
    delta_eval_loss: float | None = None
    delta_eval_loss_pct: float | None = None
    train_time_s: float | None = None
    train_steps: int | None = None
    train_real_tokens: int | None = None
    train_label_tokens: int | None = None
    train_tokens_per_s: float | None = None
    final_train_loss: float | None = None
    eval_time_s: float | None = None
    peak_memory_mib: float | None = Field(None, description="the run's own peak (see memory_kind)")
    memory_kind: str | None = None
    memory_start_mib: float | None = Field(
        None, description="memory in use when the run started (loaded base model and data), same kind as the peak")
    peak_memory_increase_mib: float | None = Field(
        None, description="peak_memory_mib - memory_start_mib: what the run itself added on top of the loaded model")
    memory_estimate_mib: float | None = Field(
        None, description="the memory plan's estimated peak of the run as it trained (loraplace.run.memory_plan), "
        "in the measure of peak_memory_mib")
    memory_plan: dict[str, Any] = Field(
        default_factory=dict, description="the gradient-checkpointing decision and why, the device's free memory, "
        "the estimates with and without checkpointing and the estimate's components (MiB)")
    position: int | None = Field(None, description="place of this run in the study's execution order (0 = first)")
    diverged: bool = Field(False, description="training diverged without a NaN: see diverged_reason")
    diverged_reason: str | None = None
    worse_than_base: bool | None = Field(
        None, description="eval loss above the base model's (set by the study store; None without a base run)")
    device: str | None = None
    precision: str | None = None
    quantization: str = Field("none", description="precision of the frozen base model: none, nf4 (4-bit "
                              "NormalFloat, QLoRA) or int8 (LLM.int8()); results before it existed: none")
    speed_choices: dict[str, str | None] = Field(
        default_factory=dict, description="how training ran: attention implementation, dropout, frozen-weight dtype")
    versions: dict[str, str] = Field(default_factory=dict)
    finished_at: str | None = None
    # Learning-rate tuning (kind='tune'; loraplace.study.tuning). eval_loss is the test split's, set
    # only once the run reached the study's last step; every choice reads validation_losses.
    tune_lr: float | None = Field(None, description="the candidate learning rate this tuning run trains at")
    tune_rung: int | None = Field(None, description="the last rung it finished (0 = first)")
    validation_loss: float | None = Field(None, description="loss on the validation split after its last rung")
    validation_losses: dict[str, float] = Field(
        default_factory=dict, description="step -> validation loss at the end of each rung it finished")
