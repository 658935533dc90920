"""loraplace: where should the LoRA adapters go?

The pipeline, a module for each step:

* placement (:mod:`loraplace.placement`): roles per architecture (``roles``, ``infer``),
  strategies (``strategies``), study arms and the reference arm ``full`` (``arms``), parameter
  counts (``params``), budget matching and the parser of parameter counts (``budget``),
  resolution to exact module names (``resolve``), and automatic placement (``allocate``,
  ``auto``) from importance scores (:mod:`loraplace.importance`); the published baselines EVA and
  AdaLoRA (:mod:`loraplace.methods`);
* data and tasks (:mod:`loraplace.data`, :mod:`loraplace.run.tasks`, :mod:`loraplace.run.models`):
  rows, tokenization and the train/eval split; what the architecture trains as (causal LM,
  seq2seq, classifier); loading models;
* training (:mod:`loraplace.run.training`);
* evaluation (:mod:`loraplace.run.evaluation`; perplexity in :mod:`loraplace.metrics`);
* study (:mod:`loraplace.study`): the records of a run (``records``: ``RunSpec``, ``RunResult``),
  the plan (``plan``: arms x seeds, run ids, execution order), one run (``runs``), executors
  (``executor``), the checks before training (``checks``), the study folder (``store``, with
  ``files`` and the ``results.md`` table in ``tables``) and the driver of a whole study
  (``driver.run_study``);
* report (:mod:`loraplace.report`): from stored study folders to tables, figures,
  recommendations, ``report.md`` and ``report.html`` (``report.write.write_report``).

The command line (:mod:`loraplace.cli`) wires these together: ``loraplace plan``, ``run``,
``report`` and ``assets``.
"""

import logging as _logging

__version__ = "0.2.0"

# bitsandbytes' CPU backend warns at import (PEFT and transformers import it whenever it is
# installed) about an optional kernel for a CPU inference layout that loraplace switches off
# (loraplace.run.quantization.prepare_quantized): nothing to act on. Set before anything imports it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
