"""Shared pieces of every alignment loss: the per-token input record, the output record, the declaration
:func:`token_loss`, input checks, masked sums, sequence log-ratios and the sigmoid preference loss."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch.nn.functional as F
from torch import Tensor

from tokenlab._checks import check_finite, check_shape, check_tensor


def check_shape_like_logps(name: str, value: Tensor | None, logps: Tensor) -> None:
    """Raise unless ``value`` (when given) is a tensor of the same ``[B, T]`` shape as ``logps``."""
    if value is None:
        return
    check_shape(name, check_tensor(name, value), logps.shape, of="`logps`")


@dataclass
class LossOutput:
    """A loss value (scalar, differentiable) and the detached scalar metrics people log."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TokenLogps:
    """Per-token quantities of a batch of completions, all ``[B, T]``.

    Attributes:
        logps: policy log-probabilities of the completion tokens (differentiable).
        mask: 1 where a token belongs to the completion (bool or 0/1 float).
        ref_logps: reference-model log-probabilities (losses with a reference need it).
        kl: per-token ``KL(π_ref ‖ π_θ)`` over the whole vocabulary (TDPO, SparsePO).
        entropy: per-token policy entropy (GTPO's entropy filter).
    """

    logps: Tensor
    mask: Tensor
    ref_logps: Tensor | None = None
    kl: Tensor | None = None
    entropy: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("logps", self.logps)
        check_tensor("mask", self.mask)
        if self.logps.ndim != 2:
            raise ValueError(f"`logps` must be [B, T], got shape {tuple(self.logps.shape)}")
        for name in ("mask", "ref_logps", "kl", "entropy"):
            check_shape_like_logps(name, getattr(self, name), self.logps)
        self.mask = self.mask.to(self.logps.dtype)
        if ((self.mask != 0) & (self.mask != 1)).any():
            raise ValueError("`mask` must hold only 0 and 1")
        if (self.mask.sum(-1) == 0).any():
            raise ValueError(
                "`mask` selects no token in some sequence; every completion needs at least one token"
            )
        for name in ("logps", "ref_logps", "kl", "entropy"):
            check_finite(name, getattr(self, name))

    @classmethod
    def trusted(
        cls,
        logps: Tensor,
        mask: Tensor,
        ref_logps: Tensor | None = None,
        kl: Tensor | None = None,
        entropy: Tensor | None = None,
    ) -> TokenLogps:
        """A record built without the constructor's checks, for inner loops whose inputs were checked once
        (``chunked_loss`` evaluates its loss once per group of tokens); ``mask`` is in ``logps``' dtype."""
        record = object.__new__(cls)
        record.logps, record.mask, record.ref_logps, record.kl, record.entropy = (
            logps,
            mask,
            ref_logps,
            kl,
            entropy,
        )
        return record

    def require(self, *names: str) -> None:
        """Raise a ``ValueError`` naming the fields a loss needs that were not given."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this loss needs TokenLogps fields {missing}")


SumOver = Literal["tokens", "sequences"]


@dataclass(frozen=True)
class LossDeclaration:
    """What :func:`~tokenlab.alignment.fused_linear.chunked_loss` needs to know about a loss.

    Attributes:
        needs: per-token quantities the loss reads besides ``logps``/``ref_logps``: ``"entropy"``, ``"kl"``.
        sum_over: ``"tokens"`` — the loss is a sum of per-token terms, each depending on the per-token
            quantities of its own token only; ``"sequences"`` — a sum of per-sequence terms, each depending
            on those of sequence ``i`` only (row ``i`` of every input record, e.g. chosen and rejected
            ``i``); ``None`` — neither. Other inputs (masks, advantages, weights, batch sizes, token counts)
            may enter any term. The finer the declaration, the earlier ``∂loss/∂quantities`` is known while
            scoring, and the fewer logits the chunked path recomputes (none for ``"tokens"``).
    """

    needs: tuple[str, ...] = ()
    sum_over: SumOver | None = None


L = TypeVar("L", bound=Callable[..., LossOutput])
TOKEN_QUANTITIES = ("entropy", "kl")


def token_loss(*, sum_over: SumOver | None, needs: tuple[str, ...] = ()) -> Callable[[L], L]:
    """Declare a loss (a function of :class:`TokenLogps` records returning a :class:`LossOutput`) for the
    chunked fused-linear path: which per-token quantities it ``needs`` and what it is a ``sum_over`` (see
    :class:`LossDeclaration`; ``tests/test_alignment_fused.py`` checks the claim for every loss in
    ``LOSSES``). A new loss is its formula plus this one line::

        @token_loss(sum_over="sequences", needs=("kl",))
        def my_loss(chosen: TokenLogps, rejected: TokenLogps, *, beta: float = 0.1) -> LossOutput: ...
    """
    unknown = set(needs) - set(TOKEN_QUANTITIES)
    if unknown:
        raise ValueError(f"`needs` must name quantities among {TOKEN_QUANTITIES}, got {sorted(unknown)}")
    if sum_over not in ("tokens", "sequences", None):
        raise ValueError(f"`sum_over` must be 'tokens', 'sequences' or None, got {sum_over!r}")

    def declare(fn: L) -> L:
        fn.token_loss = LossDeclaration(tuple(needs), sum_over)
        return fn

    return declare


def loss_declaration(loss_fn: Callable) -> LossDeclaration:
    """The :func:`token_loss` declaration of ``loss_fn`` (looking through ``functools.partial``); an
    undeclared callable needs nothing extra and is a sum over nothing finer than the batch."""
    while not hasattr(loss_fn, "token_loss") and isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return getattr(loss_fn, "token_loss", LossDeclaration())


def check_weights(name: str, weights: Tensor | None, like: TokenLogps) -> None:
    """Token weights/masks must match the tokens' shape and be finite."""
    if weights is None:
        return
    check_shape_like_logps(name, weights, like.logps)
    check_finite(name, weights)


def check_pair(chosen: TokenLogps, rejected: TokenLogps) -> None:
    """Chosen and rejected completions come in pairs: the same batch size."""
    if chosen.logps.shape[0] != rejected.logps.shape[0]:
        raise ValueError(
            f"`chosen` and `rejected` must hold the same number of pairs, got {chosen.logps.shape[0]} "
            f"and {rejected.logps.shape[0]}"
        )


def masked_sum(values: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """``Σ_t w_t · mask_t · values_t`` over the last dim (``w = 1`` when ``weights`` is None)."""
    w = mask if weights is None else mask * weights
    return (values * w).sum(-1)


def sequence_logratio(tokens: TokenLogps, weights: Tensor | None = None) -> Tensor:
    """``Σ_t w_t (log π_θ(y_t) − log π_ref(y_t))`` per sequence ``[B]`` — the (token-weighted) implicit
    reward of *Direct Preference Optimization* divided by β."""
    tokens.require("ref_logps")
    return masked_sum(tokens.logps - tokens.ref_logps, tokens.mask, weights)


def sequence_kl(tokens: TokenLogps, weights: Tensor | None = None) -> Tensor:
    """``Σ_t w_t KL(π_ref(·|y_<t) ‖ π_θ(·|y_<t))`` per sequence ``[B]`` — the sequential KL of TDPO."""
    tokens.require("kl")
    return masked_sum(tokens.kl, tokens.mask, weights)


def sigmoid_preference_loss(margin: Tensor) -> Tensor:
    """``mean −log σ(margin)``: the Bradley–Terry negative log-likelihood shared by the DPO family."""
    return -F.logsigmoid(margin).mean()


def preference_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, **extra: Tensor
) -> dict[str, Tensor]:
    """The metrics TRL logs for preference losses: mean rewards, margin and reward accuracy."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        **{k: v.detach() for k, v in extra.items()},
    }
