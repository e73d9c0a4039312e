"""chunked_loss under data parallelism, 2 CPU processes (gloo): DDP, FSDP2 (`fully_shard` per decoder layer
and on the root, which holds the LM head) and FSDP2 with a bfloat16 `MixedPrecisionPolicy`. Each rank scores
half of the pairs of a global DPO batch; the loss (mean over ranks) and every parameter's gradient equal one
process on the whole batch; under FSDP2 the number of all-gathers does not depend on the number of chunks
(the head is gathered once per step, with the root module, never per chunk)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from tokenlab.alignment import chunked_loss, completions, dpo_loss

PAIRS, T, WORLD = 4, 10, 2


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=67, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``PAIRS`` chosen then ``PAIRS`` rejected sequences, ragged completions after a 3-token prompt."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 67, (2 * PAIRS, T), generator=g)
    mask = torch.zeros_like(ids)
    mask[:, 3:] = 1
    for row in range(2 * PAIRS):
        mask[row, T - row % 3 :] = 0
    return ids, mask


def _loss(model, reference, ids, mask, chunk_size: int) -> torch.Tensor:
    scored = completions(model, ids, mask, reference_model=reference)
    half = ids.shape[0] // 2
    chosen, rejected = scored.select(slice(None, half)), scored.select(slice(half, None))
    return chunked_loss(dpo_loss, chosen, rejected, beta=0.5, chunk_size=chunk_size).loss


def _rank_rows(rank: int) -> torch.Tensor:
    per = PAIRS // WORLD
    pairs = torch.arange(rank * per, (rank + 1) * per)
    return torch.cat([pairs, PAIRS + pairs])


def _worker(rank: int, port: int, path: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    ids, mask = _batch()
    ids, mask = ids[_rank_rows(rank)], mask[_rank_rows(rank)]
    reference = _model(1).eval()
    results = {}
    gathers = []
    count = dist.all_gather_single

    def counted(*args, **kwargs):
        gathers.append(1)
        return count(*args, **kwargs)

    dist.all_gather_single = counted
    for mode in ("ddp", "fsdp2", "fsdp2-bf16"):
        model = _model(0)
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mode.endswith("bf16") else None
            kwargs = {} if policy is None else {"mp_policy": policy}
            for layer in model.model.layers:
                fully_shard(layer, **kwargs)
            wrapped = fully_shard(model, **kwargs)
        per_chunk_size = {}
        for chunk_size in (3, 1000):  # many chunks, then one
            gathers.clear()
            loss = _loss(wrapped, reference, ids, mask, chunk_size)
            loss.backward()
            per_chunk_size[chunk_size] = len(gathers)
            grads = {}
            for name, p in model.named_parameters():
                grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                p.grad = None
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach().float())
        results[mode] = {"loss": torch.stack(losses).mean(), "grads": grads, "gathers": per_chunk_size}
    dist.all_gather_single = count
    model = _model(0)  # the LM head sharded on its own: resharded after its forward, refused with a remedy
    for unit in (*model.model.layers, model.lm_head, model):
        fully_shard(unit)
    try:
        _loss(model, reference, ids, mask, 3)
    except ValueError as e:
        results["separate head"] = str(e)
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist") / "results.pt")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD)
    return torch.load(path)


@pytest.fixture(scope="module")
def single():
    model, reference = _model(0), _model(1).eval()
    ids, mask = _batch()
    loss = _loss(model, reference, ids, mask, 5)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("mode,tol", [("ddp", 1e-5), ("fsdp2", 1e-5), ("fsdp2-bf16", 3e-2)])
def test_data_parallel_equals_one_process(distributed, single, mode, tol):
    got = distributed[mode]
    assert abs(got["loss"].item() - single["loss"].item()) <= tol * abs(single["loss"].item())
    assert set(got["grads"]) == set(single["grads"])
    errors = {}
    for name, want in single["grads"].items():
        errors[name] = ((got["grads"][name].float() - want).norm() / want.norm()).item()
        assert errors[name] <= tol, (name, errors[name])
    print(f"{mode}: loss {got['loss'].item():.6f} vs {single['loss'].item():.6f}, max gradient error "
          f"{max(errors.values()):.1e} over {len(errors)} parameters")  # fmt: skip


def test_a_separately_sharded_head_is_refused_with_a_remedy(distributed):
    assert "sharded DTensor" in distributed["separate head"] and "root" in distributed["separate head"]


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2-bf16"])
def test_fsdp2_gathers_do_not_depend_on_chunks(distributed, mode):
    gathers = distributed[mode]["gathers"]
    # one all-gather for the root (embeddings, final norm, LM head) and two per decoder layer (forward and
    # the re-gather for backward); none per chunk
    assert gathers[3] == gathers[1000] == 1 + 2 * 2, gathers
