"""A run trained in rungs (stopped at a step, its checkpoint saved, continued from it) equals
the run trained straight through: same weights and the same logged losses, in float32 with LoRA
dropout, gradient accumulation and a data order that reshuffles every epoch (the resume lands in a
later epoch). Tiny random-init Llama models from a config: a few seconds."""

import torch
from test_evaluation_nll import PAD, examples
from test_training_fairness import dataset, peft_model

from loraplace.config import TrainSettings
from loraplace.data import PadCollator
from loraplace.run.training import train_adapters

CPU = torch.device("cpu")


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(tmp_path, name, stops):
    """Train 10 steps, stopping at each step of ``stops`` and continuing from its checkpoint."""
    model = peft_model(dropout=0.1)
    data = dataset(examples(12, seed=5))  # 3 optimizer steps per epoch: step 4 and 7 are in later epochs
    settings = TrainSettings(max_steps=10, batch_size=2, grad_accum=2, logging_steps=1, eval_every=0, lr=3e-3,
                             scheduler="linear", warmup_steps=2)
    out_dir, resume, logs = tmp_path / name, None, []
    for stop in [*stops, None]:
        out = train_adapters(model, data, PadCollator(PAD), settings, seed=4, precision="fp32", device=CPU,
                             output_dir=out_dir, stop_at=stop, resume_from=resume)
        logs = out.log_history
        if stop is not None:
            assert out.steps == stop
            resume = out_dir / f"checkpoint-{stop}"
            assert (resume / "optimizer.pt").is_file()
    assert out.steps == 10
    return _adapter_state(model), [(e["step"], e["loss"]) for e in logs if "loss" in e]


def test_continued_run_equals_straight_run(tmp_path):
    straight, straight_log = _train(tmp_path, "straight", [])
    pieces, pieces_log = _train(tmp_path, "pieces", [4, 7])
    assert straight.keys() == pieces.keys()
    for name in straight:
        torch.testing.assert_close(pieces[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert [s for s, _ in pieces_log] == [s for s, _ in straight_log] == list(range(1, 11))
    for (_, a), (_, b) in zip(pieces_log, straight_log):
        assert abs(a - b) < 1e-5
    # and training did move the adapters (a test that cannot pass by doing nothing)
    fresh = _adapter_state(peft_model(dropout=0.1))
    assert any(not torch.equal(fresh[n], straight[n]) for n in straight)
