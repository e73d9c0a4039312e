"""TRL trainers computing their loss through tokenlab (tokenlab.alignment.trainers): on the same batch, the
loss and every parameter gradient equal TRL's own `_compute_loss` for DPO, KTO and GRPO (float32); a tiny
model trains 5 steps with each; a token-level loss TRL lacks (TDPO) trains and lowers its objective; TRL loss
options the subclass would ignore are refused."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
import trl
from datasets import Dataset

from tokenlab.alignment import tdpo_loss
from tokenlab.alignment.trainers import DPOTrainer, GRPOTrainer, KTOTrainer
from tokenlab.testing import assert_relative_error

PROMPTS = ["def f(x):", "import os", "class A:", "for i in"]


def _config(cls, tmp_path, **kwargs):
    return cls(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        **kwargs,
    )


def _pairs() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": PROMPTS * 2,
            "chosen": [" return x", "\nimport sys", "\n    pass", " range(3):"] * 2,
            "rejected": [" x x x", "\nos os", " A A", " in in in"] * 2,
        }
    )


def _unpaired() -> Dataset:
    completions = [" return x", "\nos os", "\n    pass", " in in", " x x", "\nimport os", " A", " range(3):"]
    labels = [True, False, True, False, False, True, False, True]
    return Dataset.from_dict({"prompt": PROMPTS * 2, "completion": completions, "label": labels})


def _equal_to_trl(trainer, trl_cls, inputs, *extra) -> None:
    """Our `_compute_loss` and TRL's own (run on the same trainer, model and inputs) agree in value and in
    every parameter's gradient."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    ours = trainer._compute_loss(trainer.model, inputs, *extra)
    theirs = trl_cls._compute_loss(trainer, trainer.model, inputs, *extra)
    assert abs(ours.item() - theirs.item()) <= 1e-6 * max(1.0, abs(theirs.item())), (ours, theirs)
    assert abs(theirs.item() - round(theirs.item(), 1)) > 1e-4  # a value that says something
    for g, w in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        assert_relative_error(g, w, 1e-5, "parameter gradient vs TRL")


def _trains(trainer) -> list[float]:
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    return losses


def test_dpo_trainer_equals_trl_and_trains(tiny_world, tmp_path):
    trainer = DPOTrainer(
        model=copy.deepcopy(tiny_world.target),
        ref_model=copy.deepcopy(tiny_world.draft),
        args=_config(trl.DPOConfig, tmp_path, beta=0.5),
        train_dataset=_pairs(),
        processing_class=tiny_world.tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _equal_to_trl(trainer, trl.DPOTrainer, batch, False)
    _trains(trainer)
    assert "rewards/margins" in trainer.state.log_history[0]


def test_token_level_loss_trains_and_lowers_its_objective(tiny_world, tmp_path):
    trainer = DPOTrainer(
        model=copy.deepcopy(tiny_world.target),
        ref_model=copy.deepcopy(tiny_world.target),
        args=_config(trl.DPOConfig, tmp_path, beta=0.5),
        train_dataset=_pairs(),
        processing_class=tiny_world.tokenizer,
        loss=tdpo_loss,
        loss_kwargs={"alpha": 0.5},
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def objective() -> float:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    before = objective()
    _trains(trainer)
    after = objective()
    assert abs(before - 0.6931) < 1e-3, before  # the policy starts as the reference
    assert after < before - 0.1, (before, after)
    assert "kl/chosen" in trainer.state.log_history[0]


def test_kto_trainer_equals_trl_and_trains(tiny_world, tmp_path):
    data = _unpaired()
    config = _config(trl.KTOConfig, tmp_path, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
    trainer = KTOTrainer(
        model=copy.deepcopy(tiny_world.target),
        ref_model=copy.deepcopy(tiny_world.draft),
        args=config,
        train_dataset=data,
        processing_class=tiny_world.tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _equal_to_trl(trainer, trl.KTOTrainer, batch, False)
    _trains(trainer)


def _reward(completions, **kwargs) -> list[float]:
    return [c.count(" ") / 4 for c in completions]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_grpo_trainer_equals_trl_and_trains(tiny_world, tmp_path, loss_type):
    config = _config(
        trl.GRPOConfig,
        tmp_path,
        beta=0.04,
        loss_type=loss_type,
        num_generations=4,
        max_completion_length=8,
        epsilon=0.1,
        temperature=0.8,
    )
    trainer = GRPOTrainer(
        model=copy.deepcopy(tiny_world.target),
        reward_funcs=_reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        processing_class=tiny_world.tokenizer,
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    g = torch.Generator().manual_seed(0)
    ref = inputs["ref_per_token_logps"]  # off-policy old log-probs and another reference: clipping, KL act
    inputs["old_per_token_logps"] = ref + 0.3 * torch.randn(ref.shape, generator=g)
    inputs["ref_per_token_logps"] = ref + 0.3 * torch.randn(ref.shape, generator=g)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    _equal_to_trl(trainer, trl.GRPOTrainer, inputs)
    if loss_type == "grpo":
        _trains(trainer)


def test_trl_loss_options_that_would_be_ignored_are_refused(tiny_world, tmp_path):
    def build(**kwargs):
        return DPOTrainer(
            model=copy.deepcopy(tiny_world.target),
            ref_model=copy.deepcopy(tiny_world.target),
            args=_config(trl.DPOConfig, tmp_path, **kwargs),
            train_dataset=_pairs(),
            processing_class=tiny_world.tokenizer,
        )

    with pytest.raises(ValueError, match="label_smoothing"):
        build(label_smoothing=0.1)
    with pytest.raises(ValueError, match="f_divergence_type"):
        build(f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="loss_type"):
        GRPOTrainer(
            model=copy.deepcopy(tiny_world.target),
            reward_funcs=_reward,
            args=_config(
                trl.GRPOConfig, tmp_path, loss_type="dapo", num_generations=4, max_completion_length=8
            ),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tiny_world.tokenizer,
        )


def test_kto_reference_under_peft_is_the_adapter_free_model(tiny_world, tmp_path):
    """With a PEFT model and no `ref_model`, the reference is the model with its adapters disabled, as in TRL
    (TRL#7063: the fused KTO path ignored the reference under PEFT)."""
    peft = pytest.importorskip("peft")
    data = _unpaired()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = KTOTrainer(
        model=copy.deepcopy(tiny_world.target),
        args=_config(trl.KTOConfig, tmp_path, beta=0.5),
        train_dataset=data,
        processing_class=tiny_world.tokenizer,
        peft_config=lora,
    )
    assert trainer.ref_model is None
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _equal_to_trl(trainer, trl.KTOTrainer, batch, False)
