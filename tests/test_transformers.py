"""The Hugging Face Trainer callback: a Monitor driven by Trainer.train."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import probescope as ps

transformers = pytest.importorskip("transformers")  # in the dev extra: CI runs these
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from probescope.integrations.transformers import ProbescopeCallback  # noqa: E402

VOCAB, LENGTH, CLASSES = 32, 8, 3


def _tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids; the label is the second token mod 3 (a rule a model can learn)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    return ids, ids[:, 1] % CLASSES


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0, causal: bool = False):
        self.ids, self.labels = _tokens(n, seed)
        self.causal = causal

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i] if self.causal else self.labels[i]}


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
    )
    return BertForSequenceClassification(config)


def _llama():
    """A causal LM whose loss is normalised by the items of the accumulated batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config)


class Classifier(nn.Module):
    """A plain module the Trainer can train: no **kwargs, so its loss is each micro-batch's mean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16 * LENGTH, CLASSES)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids).flatten(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _trainer(tmp_path, model, callbacks, *, steps=12, accumulate=1, logging=1, causal=False, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=accumulate,
        learning_rate=kwargs.pop("learning_rate", 5e-3),
        logging_steps=logging,
        report_to=[],
        use_cpu=kwargs.pop("use_cpu", True),
        save_strategy=kwargs.pop("save_strategy", "no"),
        disable_tqdm=True,
        **kwargs,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(512, causal=causal),
        eval_dataset=Tokens(64, seed=1, causal=causal),
        callbacks=callbacks,
    )


def _logged(trainer, key: str) -> tuple[list[int], list[float]]:
    entries = [e for e in trainer.state.log_history if key in e]
    return [e["step"] for e in entries], [e[key] for e in entries]


def _series(run, name: str) -> tuple[list[int], np.ndarray]:
    last = run.probe("loss").frame(-1).data
    return last[f"series/{name}/steps"].tolist(), last[f"series/{name}/values"]


def test_training_is_monitored_step_by_step_with_the_trainers_losses_and_metrics(tmp_path):
    ids, labels = _tokens(40, seed=2)
    callback = ProbescopeCallback(
        [
            ps.PredictionProbe(ids, labels, schedule=ps.Schedule.every(3)),
            ps.StatsProbe(schedule=ps.Schedule.every(4)),
            ps.LossProbe(schedule=ps.Schedule.every(6)),
        ],
        run_dir=tmp_path / "run",
        snapshot="sync",  # every due frame taken (a copy's frame is skipped while one runs)
    )
    model = _bert()
    trainer = _trainer(tmp_path, model, [callback], eval_strategy="steps", eval_steps=6)
    trainer.train()

    monitor = callback.monitor
    assert monitor.model is model and monitor.step_count == trainer.state.global_step == 12
    # The Trainer hands callbacks accelerate's wrapper: the Monitor hooks the optimizer inside.
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert monitor.optimizer is trainer.optimizer.optimizer
    for name, counters in monitor.summary()["probes"].items():
        assert counters["failed"] == 0 and counters["frames"] >= 2, (name, counters)
    run = ps.open_run(tmp_path / "run")
    assert run.meta["finished"] and run.meta["status"] == "finished"
    assert run.probe("prediction").steps() == [0, 3, 6, 9, 12]
    # The probe read the ModelOutput's logits: its last frame is the trained model's softmax.
    model.eval()
    with torch.no_grad():
        own = torch.softmax(model(ids).logits, -1)
    last = run.probe("prediction").frame(-1).data
    torch.testing.assert_close(
        torch.as_tensor(last["prob_true"]), own.gather(1, labels[:, None])[:, 0].double(), atol=1e-5, rtol=0
    )
    assert last["accuracy"] == (own.argmax(1) == labels).double().mean().item()

    # Each step's loss, read from the model's outputs, is what the Trainer logs at that step.
    steps, values = _series(run, "train_loss")
    logged_steps, logged = _logged(trainer, "loss")
    assert steps == logged_steps == list(range(1, 13))
    np.testing.assert_allclose(values, logged, rtol=1e-5, atol=0)
    for name, logged_name in (("grad_norm", "grad_norm"), ("lr", "learning_rate")):
        steps, values = _series(run, name)  # the rate each step used, as the Trainer logs it
        logged_steps, logged = _logged(trainer, logged_name)
        assert steps == logged_steps
        np.testing.assert_allclose(values, logged, rtol=1e-6, atol=0)
    assert "series/learning_rate/steps" not in run.probe("loss").frame(-1).data  # not twice
    steps, values = _series(run, "valid_loss")  # the Trainer's evaluations, as valid_loss
    logged_steps, logged = _logged(trainer, "eval_loss")
    assert steps == logged_steps == [6, 12]
    np.testing.assert_allclose(values, logged, rtol=1e-6, atol=0)
    # A step's frames are taken once the Trainer has logged and evaluated it: they see its metrics.
    at_6 = run.probe("loss").frame(1).data
    assert run.probe("loss").frame(1).step == 6
    assert at_6["series/valid_loss/steps"].tolist() == [6] and at_6["series/grad_norm/steps"][-1] == 6
    names = {key.split("/")[1] for key in run.probe("loss").frame(-1).data}
    assert not {n for n in names if "runtime" in n or "per_second" in n or n in ("epoch", "total_flos")}


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_checkpoints_keep_the_best_model_by_the_trainers_evaluations(tmp_path, caplog, strategy):
    # 512 samples, 16 a step: 32 steps an epoch; evaluated every 8 steps or every epoch.
    every = 8 if strategy == "steps" else 32
    checkpoint = ps.CheckpointProbe("valid_loss", schedule=ps.Schedule.every(every))
    heard = []

    class Validations(ps.Callback):  # a Monitor callback hears each evaluation, at its step
        def after_validate(self, monitor, **values):
            heard.append((monitor.step_count, values["valid_loss"]))

    callbacks = [Validations()]
    callback = ProbescopeCallback(
        [checkpoint], run_dir=tmp_path / "run", snapshot="sync", callbacks=callbacks
    )
    model = Classifier()
    trainer = _trainer(
        tmp_path, model, [callback], steps=64, learning_rate=0.05, eval_strategy=strategy, eval_steps=8
    )
    with caplog.at_level(logging.WARNING, logger="probescope"):
        trainer.train()
    assert not [r for r in caplog.records if "CheckpointProbe" in r.getMessage()]
    steps, values = _logged(trainer, "eval_loss")
    assert steps == list(range(every, 65, every))
    assert [step for step, _ in heard] == steps and [v for _, v in heard] == pytest.approx(values)
    index = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())
    best = int(np.argmin(values))
    assert index["best"]["step"] == steps[best]
    assert index["best"]["value"] == pytest.approx(values[best], rel=1e-6)


@pytest.mark.parametrize("model", [_llama, Classifier], ids=["shares-of-the-step", "micro-batch-means"])
def test_with_gradient_accumulation_each_steps_loss_is_the_trainers(tmp_path, model):
    # LlamaForCausalLM divides by the tokens of the whole accumulated batch: the step's loss
    # is the sum of its micro-batches'. Classifier's losses are means: the step's is their mean.
    callback = ProbescopeCallback([ps.LossProbe(schedule=ps.Schedule.every(100))], run_dir=tmp_path / "run")
    trainer = _trainer(tmp_path, model(), [callback], steps=6, accumulate=3, causal=model is _llama)
    trainer.train()
    run = ps.open_run(tmp_path / "run")
    steps, values = _series(run, "train_loss")
    logged_steps, logged = _logged(trainer, "loss")
    assert steps == logged_steps == list(range(1, 7))
    np.testing.assert_allclose(values, logged, rtol=1e-5, atol=0)


def test_a_model_without_a_loss_in_its_outputs_gets_the_loss_the_trainer_logs(tmp_path):
    def loss_fn(outputs, labels, num_items_in_batch=None):  # the model sees no labels
        return nn.functional.cross_entropy(outputs["logits"], labels)

    callback = ProbescopeCallback([ps.LossProbe(schedule=ps.Schedule.every(100))], run_dir=tmp_path / "run")
    trainer = _trainer(tmp_path, Classifier(), [callback], steps=8, logging=2)
    trainer.compute_loss_func = loss_fn
    trainer.train()
    steps, values = _series(ps.open_run(tmp_path / "run"), "train_loss")
    logged_steps, logged = _logged(trainer, "loss")
    assert steps == logged_steps == [2, 4, 6, 8]
    np.testing.assert_allclose(values, logged, rtol=1e-6, atol=0)


def test_evaluating_after_training_records_nothing_and_a_later_training_has_a_run_of_its_own(
    tmp_path, caplog
):
    callback = ProbescopeCallback([ps.LossProbe(schedule=ps.Schedule.every(100))], run_dir=tmp_path / "run")
    trainer = _trainer(tmp_path, Classifier(), [callback], steps=4)
    trainer.train()
    with caplog.at_level(logging.WARNING, logger="probescope"):
        trainer.evaluate()
        trainer.log({"after": 1.0})
    assert not caplog.records
    assert "valid_loss" not in callback.monitor.history.read()  # the run was finished
    _, values = _series(ps.open_run(tmp_path / "run"), "train_loss")
    assert len(values) == 4
    trainer.args.max_steps = 6
    trainer.train()
    first, second = ps.open_run(tmp_path / "run"), ps.open_run(tmp_path / "run-fit2")
    assert first.meta["summary"]["steps"] == 4 and second.meta["summary"]["steps"] == 6
    assert second.meta["finished"] and callback.fits == 2


class Diverge(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("training diverged")


def test_a_failing_training_closes_the_monitor_and_keeps_its_frames(tmp_path):
    probe = ps.PredictionProbe(*_tokens(20, seed=2), schedule=ps.Schedule.every(1))
    callback = ProbescopeCallback([probe], run_dir=tmp_path / "run", snapshot="sync")
    with pytest.raises(RuntimeError, match="training diverged"), callback:
        _trainer(tmp_path, Classifier(), [callback, Diverge()]).train()
    run = ps.open_run(tmp_path / "run")
    assert run.meta["finished"] and run.meta["status"] == "failed"
    assert run.meta["error"] == "RuntimeError: training diverged"
    assert run.probe("prediction").steps() == [0, 1, 2, 3]


def test_training_from_a_checkpoint_goes_on_in_the_same_run_from_its_step(tmp_path):
    def callback():
        probe = ps.PredictionProbe(*_tokens(20, seed=2), schedule=ps.Schedule.every(2))
        return ProbescopeCallback([probe], run_dir=tmp_path / "run", snapshot="sync", resume=True)

    first = _trainer(tmp_path, Classifier(), [callback()], steps=10, save_strategy="steps", save_steps=4)
    first.train()
    resumed = callback()
    trainer = _trainer(tmp_path, Classifier(), [resumed], steps=10)
    trainer.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-4"))
    assert trainer.state.global_step == 10 and resumed.monitor.resumed_at == 4
    run = ps.open_run(tmp_path / "run")
    assert [r["step"] for r in run.meta["resumes"]] == [4]
    assert run.probe("prediction").steps() == list(range(0, 12, 2))
    assert run.meta["summary"]["steps"] == 10


class LastLogits(nn.Module):
    """What probes read of a language model: the next token's logits after each prompt."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits[:, -1]


def test_a_language_model_is_probed_through_a_module_that_holds_it(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)  # its output layer is its token embedding (tied weights)
    ids, _ = _tokens(24, seed=2)
    prompts, following = ids[:, :-1], ids[:, -1]
    probe = ps.PredictionProbe(prompts, following, schedule=ps.Schedule.every(3))
    loss = ps.LossProbe(schedule=ps.Schedule.every(100))
    probed = LastLogits(model)
    callback = ProbescopeCallback([probe, loss], model=probed, run_dir=tmp_path / "run", snapshot="sync")
    trainer = _trainer(tmp_path, model, [callback], steps=6, accumulate=2, causal=True)
    trainer.train()
    run = ps.open_run(tmp_path / "run")
    assert run.probe("prediction").steps() == [0, 3, 6]
    model.eval()
    with torch.no_grad():
        own = torch.softmax(model(prompts).logits[:, -1], -1)
    torch.testing.assert_close(
        torch.as_tensor(run.probe("prediction").frame(-1).data["prob_true"]),
        own.gather(1, following[:, None])[:, 0].double(),
        atol=1e-5,
        rtol=0,
    )
    steps, values = _series(run, "train_loss")  # read from the Trainer's model, not the wrapper
    logged_steps, logged = _logged(trainer, "loss")
    assert steps == logged_steps == list(range(1, 7))
    np.testing.assert_allclose(values, logged, rtol=1e-5, atol=0)


def test_a_probed_model_that_does_not_hold_the_trainers_is_refused_when_training_starts(tmp_path):
    callback = ProbescopeCallback([ps.LossProbe()], model=LastLogits(_llama()), run_dir=tmp_path / "run")
    refused = r"model= \(LastLogits\) must hold the Trainer's model \(Classifier\)"
    with pytest.raises(ValueError, match=refused):
        _trainer(tmp_path, Classifier(), [callback], steps=2).train()


def test_unknown_monitor_arguments_are_refused_at_construction():
    with pytest.raises(TypeError, match=r"unknown Monitor arguments \['optimizer', 'run_directory'\]"):
        ProbescopeCallback([], run_directory="x", optimizer=None)


def test_the_callback_pickles_after_training_without_its_monitor(tmp_path):
    probe = ps.LossProbe(schedule=ps.Schedule.every(100))
    callback = ProbescopeCallback([probe], run_dir=tmp_path / "run")
    _trainer(tmp_path, Classifier(), [callback], steps=2).train()
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.monitor is None and copy.fits == 1 and copy.monitor_kwargs == callback.monitor_kwargs
    assert [p.name for p in copy.probes] == ["loss"]


TORCHRUN_SCRIPT = """
import sys, torch, torch.distributed as dist, probescope as ps
from transformers import Trainer, TrainingArguments
from probescope.integrations.transformers import ProbescopeCallback
sys.path.insert(0, sys.argv[2])
from tests.test_transformers import Classifier, Tokens, _tokens

ids, labels = _tokens(64, seed=2)
every = ps.Schedule.every
probes = [ps.PredictionProbe(ids, labels, schedule=every(4)), ps.LossProbe(schedule=every(8))]
callback = ProbescopeCallback(probes, run_dir=sys.argv[1], snapshot="sync")  # every due frame
args = TrainingArguments(sys.argv[1] + "-trainer", max_steps=16, per_device_train_batch_size=16,
                         learning_rate=0.05, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, disable_tqdm=True)
Trainer(Classifier(), args, train_dataset=Tokens(512), callbacks=[callback]).train()
print(f"rank {dist.get_rank()} probing {callback.monitor.probing} steps {callback.monitor.step_count}")
dist.barrier()
dist.destroy_process_group()
"""


def test_under_torchrun_one_rank_probes_and_writes_the_run(tmp_path):
    from pathlib import Path

    from tests.conftest import torchrun

    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    done, folder = torchrun(script, "run", str(Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr[-3000:]
    tmp_path = folder  # the attempt's folder holds the run
    assert "rank 0 probing True steps 16" in done.stdout and "rank 1 probing False steps 16" in done.stdout
    run = ps.open_run(tmp_path / "run")
    assert run.meta["finished"] and run.meta["distributed"]["world_size"] == 2
    assert run.meta["distributed"]["rank"] == 0 and run.meta["summary"]["steps"] == 16
    assert run.probe("prediction").steps() == [0, 4, 8, 12, 16]
    last = run.probe("loss").frame(-1).data
    assert last["series/train_loss/steps"].tolist() == list(range(1, 17))  # rank 0's own losses


def test_without_probes_the_callback_records_every_steps_loss_and_the_evaluations(tmp_path):
    callback = ProbescopeCallback(run_dir=tmp_path / "run")
    trainer = _trainer(tmp_path, Classifier(), [callback], steps=6, eval_strategy="steps", eval_steps=3)
    trainer.train()
    run = ps.open_run(tmp_path / "run")
    assert list(run.probes) == ["loss"] and run.probe("loss").config["schedule"]["kind"] == "log_spaced"
    assert run.probe("loss").steps()[-1] == 6
    assert _series(run, "train_loss")[0] == list(range(1, 7)) and _series(run, "valid_loss")[0] == [3, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_trainers_model_is_probed_from_copies_on_the_probe_stream(tmp_path):
    """The CUDA path under the Trainer: copies on the probe stream, the training stream waiting
    for a copy only before the next optimizer step (a pre-hook on the optimizer inside
    accelerate's wrapper), frames of the trained weights."""
    ids, labels = _tokens(40, seed=2)
    probes = [ps.PredictionProbe(ids, labels, schedule=ps.Schedule.every(3)), ps.LossProbe()]
    callback = ProbescopeCallback(probes, run_dir=tmp_path / "run")
    model = _bert()
    trainer = _trainer(tmp_path, model, [callback], use_cpu=False)
    assert trainer.args.device.type == "cuda"
    trainer.train()
    monitor = callback.monitor
    assert monitor._streams is not None and monitor._optimizer_hook is not None
    assert monitor.snapshot_detail["strategy"] == "copy" and not monitor.snapshot_detail["host"]
    for name, counters in monitor.summary()["probes"].items():
        assert counters["failed"] == 0 and counters["frames"] >= 2, (name, counters)
    run = ps.open_run(tmp_path / "run")
    model.eval()
    with torch.no_grad():
        own = torch.softmax(model(ids.cuda()).logits, -1).cpu()
    last = run.probe("prediction").frame(-1)
    assert last.step == 12
    expected = own.gather(1, labels[:, None])[:, 0].double()
    torch.testing.assert_close(torch.as_tensor(last.data["prob_true"]), expected, atol=1e-4, rtol=0)
    steps, values = _series(run, "train_loss")
    logged_steps, logged = _logged(trainer, "loss")
    assert steps == logged_steps == list(range(1, 13))
    np.testing.assert_allclose(values, logged, rtol=1e-4, atol=0)


# ---- a language model sharded with FSDP2 ---------------------------------------------------


class LastTokenLogits(nn.Module):
    """A causal LM's logits at the last position: one row of class scores per sequence."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits[:, -1]


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,  # one weight under two names
    )
    return LastTokenLogits(LlamaForCausalLM(config))  # rotary inv_freq: a buffer out of the state_dict


def _sharded_llama_job(rank: int, world: int, store: str, out: str) -> None:
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from tests.test_distributed import _join, _leave

    _join(rank, world, store)
    try:
        torch.manual_seed(0)
        model, reference = _tiny_llama(), _tiny_llama()
        reference.load_state_dict(model.state_dict())
        for layer in model.lm.model.layers:
            fully_shard(layer)
        fully_shard(model.lm)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
        ids = [
            torch.randint(0, 64, (72, 12), generator=torch.Generator().manual_seed(r)) for r in range(world)
        ]
        held = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(9))
        probes = [
            ps.PredictionProbe(held, held[:, 0], schedule=ps.Schedule.every(3)),
            ps.StatsProbe(
                ["lm.model.layers.0", "lm.model.layers.1.mlp.*"], batch=held, schedule=ps.Schedule.every(3)
            ),
        ]
        run_dir = Path(store).parent / "run"
        with ps.Monitor(
            model, probes, optimizer=optimizer, run_dir=run_dir, unsharded=_tiny_llama
        ) as monitor:
            for step in range(9):
                batch = ids[rank][step * 8 : step * 8 + 8]
                loss = model.lm(input_ids=batch, labels=batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                whole = torch.cat([i[step * 8 : step * 8 + 8] for i in ids])
                ref_optimizer.zero_grad()  # the mean of the ranks' losses: each rank's batch is 8
                (sum(reference.lm(input_ids=whole[k * 8 : k * 8 + 8], labels=whole[k * 8 : k * 8 + 8]).loss
                     for k in range(world)) / world).backward()  # fmt: skip
                ref_optimizer.step()
                monitor.step(loss=loss)
        with torch.no_grad():
            probs = torch.softmax(reference(held), 1)
        result = {
            "probing": monitor.probing,
            "summary": monitor.summary(),
            "reference_probs": probs[torch.arange(16), held[:, 0]].tolist(),
            "reference_state": {k: v.tolist() for k, v in reference.state_dict().items()},
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        _leave()


def test_a_language_model_sharded_with_fsdp2_is_probed_through_its_gathered_weights(tmp_path):
    """A Llama with tied embeddings and rotary buffers, sharded per layer, trained on two ranks
    beside the same model unsharded: the last frames are the unsharded model's."""
    from tests.test_distributed import run_ranks

    prober, _ = run_ranks(_sharded_llama_job, tmp_path)
    for name, counters in prober["summary"]["probes"].items():
        assert counters["failed"] == 0 and counters["frames"] == 4, (name, counters)
    run = ps.open_run(tmp_path / "run")
    last = run.probe("prediction").frame(-1)
    assert last.step == 9
    np.testing.assert_allclose(last.data["prob_true"], prober["reference_probs"], rtol=0, atol=1e-5)
    stats = run.probe("stats").table()
    assert "act/lm.model.layers.0/mean" in stats.columns  # a decoder layer's output (named exactly)
    state = torch.load(tmp_path / "run" / "model.pt")
    assert sorted(state) == sorted(prober["reference_state"])  # tied names both there
    for key, value in prober["reference_state"].items():
        np.testing.assert_allclose(state[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)
