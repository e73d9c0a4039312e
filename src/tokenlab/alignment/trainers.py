"""TRL trainers whose loss is a tokenlab loss, evaluated by
:func:`~tokenlab.alignment.fused_linear.chunked_loss`.

:class:`DPOTrainer`, :class:`KTOTrainer` and :class:`GRPOTrainer` subclass TRL's trainers of the same name
(TRL ≥ 1.16, an optional dependency) and keep everything TRL does — data pipeline and collators, reference
model (``ref_model``, or the PEFT model with its adapters disabled), generation and rewards (GRPO), gradient
accumulation, logging — but compute the loss with ``chunked_loss`` on the model's last hidden states and LM
head: any tokenlab loss of the trainer's kind, including the token-level ones TRL lacks (TDPO, SparsePO, cDPO,
T-REG on pairs; GTPO, IcePop on groups), with the head's gradients computed during the forward pass. The hook
is TRL's own per-trainer ``_compute_loss``; the extra constructor arguments are ``loss`` (a loss function),
``loss_kwargs`` (its options; β comes from the TRL config) and ``chunk_size``::

    trainer = DPOTrainer(model, ref_model=ref, args=DPOConfig(...), train_dataset=pairs,
                         processing_class=tokenizer, loss=tdpo_loss, loss_kwargs={"alpha": 0.5})

TRL options that change TRL's own loss formula (``loss_type`` other than DPO's ``sigmoid``, KTO's ``kto`` and
GRPO's ``grpo``/``bnpo``/``dr_grpo``; f-divergences, label smoothing, WPO weighting, entropy bonus, …) are
refused at construction rather than silently ignored: write them as a tokenlab loss (a formula plus its
:func:`~tokenlab.alignment.common.token_loss` line), and the chunked path runs it unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from tokenlab._checks import check_int
from tokenlab.alignment.common import LossOutput
from tokenlab.alignment.fused_linear import Completions, LinearHead, chunked_loss
from tokenlab.alignment.hf import completions
from tokenlab.alignment.policy import grpo_loss
from tokenlab.alignment.preference import dpo_loss
from tokenlab.alignment.unpaired import kto_loss

GRPO_NORMALIZATIONS = {"grpo": "sequence", "bnpo": "token", "dr_grpo": "dr_grpo"}
"""TRL's GRPO ``loss_type`` → tokenlab's ``normalization`` of the policy losses (the same definitions)."""


class _TokenlabLoss:
    """What the three trainers share: the extra constructor arguments, the refusal of TRL options that would
    be ignored, reference scoring and metric logging in TRL's conventions. A trainer states its default loss
    and, in :meth:`_loss_options`, the TRL options that change TRL's loss formula."""

    default_loss: Callable[..., LossOutput]

    def __init__(
        self,
        *args,
        loss: Callable[..., LossOutput] | None = None,
        loss_kwargs: dict | None = None,
        chunk_size: int = 1024,
        **kwargs,
    ) -> None:
        loss = type(self).default_loss if loss is None else loss
        if not callable(loss):
            raise TypeError(f"`loss` must be a tokenlab loss function, got {type(loss).__name__}")
        check_int("chunk_size", chunk_size, low=1)
        super().__init__(*args, **kwargs)
        self.loss, self.loss_kwargs, self.chunk_size = loss, dict(loss_kwargs or {}), chunk_size
        self._refuse(self._loss_options())

    def _loss_options(self) -> dict[str, tuple[Any, Any]]:
        """``name: (value, default)`` of the TRL options that change TRL's own loss formula."""
        raise NotImplementedError

    def _refuse(self, settings: dict[str, tuple[Any, Any]]) -> None:
        changed = {name: value for name, (value, default) in settings.items() if value != default}
        if changed:
            raise ValueError(
                f"{type(self).__name__} computes its loss with tokenlab (`loss=`); these TRL options change "
                f"TRL's own loss formula and would be ignored: {changed}; write it as a tokenlab loss"
            )

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The reference model, as TRL's trainers define it: ``ref_model``, or the PEFT policy with its
        adapters disabled (or its "ref" adapter), under ``no_grad`` with gradient checkpointing off."""
        checkpointing = self.args.gradient_checkpointing_kwargs
        with torch.no_grad(), disable_gradient_checkpointing(self.model, checkpointing):
            if self.ref_model is not None:
                yield self.ref_model
                return
            if not is_peft_model(self.model):
                raise ValueError("a reference model is needed: pass `ref_model` or train a PEFT adapter")
            unwrapped = self.accelerator.unwrap_model(self.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                yield self.model

    def _log(self, out: LossOutput) -> None:
        mode = "train" if self.model.training else "eval"
        for name, value in out.metrics.items():
            gathered = self.accelerator.gather_for_metrics(value.detach().float().reshape(1))
            self._metrics[mode][name].append(gathered.nanmean().item())


def _with_reference(policy: Completions, reference: Completions) -> Completions:
    return Completions(policy.head, policy.labels, reference.head)


class DPOTrainer(_TokenlabLoss, trl.DPOTrainer):
    """TRL's ``DPOTrainer`` with a tokenlab paired loss (``dpo_loss`` by default; any loss of
    ``(chosen, rejected, *, beta, ...)``) computed by ``chunked_loss``; β is ``args.beta``."""

    default_loss = staticmethod(dpo_loss)

    def _loss_options(self) -> dict[str, tuple[Any, Any]]:
        a = self.args
        return dict(
            loss_type=(list(a.loss_type), ["sigmoid"]),
            f_divergence_type=(str(getattr(a.f_divergence_type, "value", a.f_divergence_type)), "reverse_kl"),
            label_smoothing=(a.label_smoothing, 0.0),
            use_weighting=(a.use_weighting, False),
            ld_alpha=(a.ld_alpha, None),
            precompute_ref_log_probs=(a.precompute_ref_log_probs, False),
            aux_loss=(self.aux_loss_enabled, False),
        )

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False):
        if return_outputs:
            raise ValueError(f"{type(self).__name__} does not return outputs (it builds no logits)")
        ids, mask, attention = inputs["input_ids"], inputs["completion_mask"], inputs["attention_mask"]
        scored = completions(model, ids, mask, attention_mask=attention)
        with self._reference() as reference:
            scored = _with_reference(scored, completions(reference, ids, mask, attention_mask=attention))
        half = ids.shape[0] // 2  # TRL's batches hold the chosen completions, then the rejected ones
        chosen, rejected = scored.select(slice(None, half)), scored.select(slice(half, None))
        out = chunked_loss(
            self.loss, chosen, rejected, chunk_size=self.chunk_size, beta=self.beta, **self.loss_kwargs
        )
        self._log(out)
        return out.loss


class KTOTrainer(_TokenlabLoss, trl.KTOTrainer):
    """TRL's ``KTOTrainer`` with a tokenlab unpaired loss (``kto_loss`` by default; any loss of
    ``(tokens, desirable, *, kl_logratios, beta, desirable_weight, undesirable_weight, ...)``) computed by
    ``chunked_loss``. KTO's reference point comes from TRL's mismatched (KL) completions, gathered across
    processes."""

    default_loss = staticmethod(kto_loss)

    def _loss_options(self) -> dict[str, tuple[Any, Any]]:
        return dict(
            loss_type=(self.args.loss_type, "kto"),
            precompute_ref_log_probs=(self.args.precompute_ref_log_probs, False),
            aux_loss=(self.aux_loss_enabled, False),
        )

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False):
        if return_outputs:
            raise ValueError(f"{type(self).__name__} does not return outputs (it builds no logits)")
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
        ids, mask, attention = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
        scored = completions(model, ids, mask, attention_mask=attention)
        with torch.no_grad():
            kl_logps = self._compute_kl_logps(model, batch)
        with self._reference() as reference:
            scored = _with_reference(scored, completions(reference, ids, mask, attention_mask=attention))
            ref_kl_logps = self._compute_kl_logps(reference, batch)
        kl_logratios = self.accelerator.gather(kl_logps - ref_kl_logps)
        out = chunked_loss(
            self.loss,
            scored,
            chunk_size=self.chunk_size,
            desirable=batch["label"],
            kl_logratios=kl_logratios,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            **self.loss_kwargs,
        )
        self._log(out)
        return out.loss


class GRPOTrainer(_TokenlabLoss, trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` with a tokenlab policy loss (``grpo_loss`` by default; any loss of
    ``(tokens, advantages, *, old_logps, ...)`` such as ``gtpo_loss`` or ``icepop_loss``) computed by
    ``chunked_loss``. TRL generates, scores and computes the advantages, old and reference log-probs; the
    policy's log-probs are taken at TRL's sampling ``temperature`` (the head's weight divided by it). For
    ``grpo_loss``, β, ε and the normalisation come from the config (``loss_type`` grpo/bnpo/dr_grpo); other
    losses get ``group_size`` and ``completion_ids`` when their signature asks for them."""

    default_loss = staticmethod(grpo_loss)

    def _loss_options(self) -> dict[str, tuple[Any, Any]]:
        a = self.args
        if a.loss_type not in GRPO_NORMALIZATIONS:
            raise ValueError(f"`loss_type` must be one of {sorted(GRPO_NORMALIZATIONS)}, got {a.loss_type!r}")
        return dict(
            importance_sampling_level=(a.importance_sampling_level, "token"),
            top_entropy_quantile=(a.top_entropy_quantile, 1.0),
            entropy_coef=(a.entropy_coef, 0.0),
            use_adaptive_entropy=(a.use_adaptive_entropy, False),
            off_policy_mask_threshold=(a.off_policy_mask_threshold, None),
            delta=(a.delta, None),
            vllm_importance_sampling_correction=(a.use_vllm and a.vllm_importance_sampling_correction, False),
            aux_loss=(self.aux_loss_enabled, False),
        )

    def _policy_kwargs(self, inputs: dict[str, Tensor]) -> dict[str, Any]:
        """The loss's keyword arguments from TRL's batch: those of ``grpo_loss`` for it, else the batch fields
        a policy loss may name (``old_logps``, ``completion_ids``, ``group_size``)."""
        old = inputs.get("old_per_token_logps")
        if self.loss is grpo_loss:
            return dict(
                old_logps=old,
                beta=self.beta,
                epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high,
                normalization=GRPO_NORMALIZATIONS[self.loss_type],
                max_completion_length=self.max_completion_length,
                kl_importance_weight=self.args.use_bias_correction_kl,
            )
        names = inspect.signature(self.loss).parameters
        offered = dict(
            old_logps=old, completion_ids=inputs["completion_ids"], group_size=self.num_generations
        )
        return {k: v for k, v in offered.items() if k in names and k not in self.loss_kwargs}

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Tensor]):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            completion_mask = completion_mask * inputs["tool_mask"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        full_mask = torch.cat([torch.zeros_like(prompt_ids), completion_mask], dim=1)
        scored = completions(model, ids, full_mask, attention_mask=attention, last=completion_ids.shape[1])
        if self.temperature != 1.0:
            head = scored.head
            scaled = LinearHead(head.hidden, head.weight / self.temperature,
                                None if head.bias is None else head.bias / self.temperature)  # fmt: skip
            scored = Completions(scaled, scored.labels)
        scored.ref_logps = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        out = chunked_loss(
            self.loss,
            scored,
            chunk_size=self.chunk_size,
            advantages=inputs["advantages"],
            **self._policy_kwargs(inputs),
            **self.loss_kwargs,
        )
        self._log(out)
        mode = "train" if self.model.training else "eval"
        return out.loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)
