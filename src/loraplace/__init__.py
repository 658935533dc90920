"""loraplace: where should the LoRA adapters go?

The pipeline, a module for each step:

* placement (:mod:`loraplace.placement`): roles per architecture (``roles``, ``infer``),
  strategies (``strategies``), study arms and the reference arm ``full`` (``arms``), parameter
  counts (``params``), budget matching and the parser of parameter counts (``budget``), and
  resolution to exact module names (``resolve``);
* data and tasks (:mod:`loraplace.data`, :mod:`loraplace.tasks`, :mod:`loraplace.models`):
  rows, tokenization and the train/eval split; what the architecture trains as (causal LM,
  seq2seq, classifier); loading models;
* training (:mod:`loraplace.training`);
* evaluation (:mod:`loraplace.evaluation`; perplexity in :mod:`loraplace.metrics`);
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

__version__ = "0.1.0"
