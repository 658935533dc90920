"""The life of one run, below the recipe that composes it (:mod:`loraplace.study.runs`):

* :mod:`~loraplace.run.device`: the device and the precision (one decision, made once, recorded);
* :mod:`~loraplace.run.models`, :mod:`~loraplace.run.quantization`: finding, loading and
  quantizing the base model;
* :mod:`~loraplace.run.tasks`: what a model is trained for (causal LM, seq2seq, classification);
* :mod:`~loraplace.run.context`: what the runs of one process share (model, tokenizer, data);
* :mod:`~loraplace.run.training`, :mod:`~loraplace.run.evaluation`: the Trainer and the loss;
* :mod:`~loraplace.run.memory_plan`, :mod:`~loraplace.run.measure`: memory before (estimated) and
  during (measured) a run.
"""
