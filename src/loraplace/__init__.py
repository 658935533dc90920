"""loraplace: where should the LoRA adapters go?

The pipeline, one package each:
placement (roles, strategies, parameter counts) -> data -> training -> evaluation
-> study (runs, executor, store) -> report.
"""

__version__ = "0.1.0"
