"""Learned chunking modules: each rule against its formula on constructed inputs, the reductions the
papers state (a gate that keeps everything = the plain encoder; soft deletion → hard deletion as the
gate floor → −∞; upsampling inverts downsampling when boundaries are certain; vocabulary-permutation
invariance), and a short training run on stdlib bytes in which the loss falls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenlab.tokenization import (
    DeleteGateEncoder,
    DynamicChunking,
    LexinvariantEmbedding,
    MrT5DeleteGate,
    WordPooling,
    word_ids_from_text,
)
from tokenlab.tour.toy import stdlib_documents

D, HEADS = 16, 2


def layers(n: int, dtype=torch.float32) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(
        nn.TransformerEncoderLayer(D, HEADS, 32, dropout=0.0, batch_first=True, dtype=dtype) for _ in range(n)
    )


@pytest.fixture(scope="module")
def byte_batches() -> list[torch.Tensor]:
    """Ten batches of 8 stdlib snippets, 48 bytes each."""
    data = torch.tensor(list(stdlib_documents("train", max_bytes=40_000)[0][1].encode()[:20_000]))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - 49, (80,), generator=g)
    windows = torch.stack([data[s : s + 49] for s in starts.tolist()])
    return list(windows.split(8))


def causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def train(model: nn.Module, loss_fn, batches, steps: int = 40) -> tuple[float, float]:
    """Adam on ``loss_fn(model, batch)``; mean loss over the first and the last 5 steps."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


# ------------------------------------------------------------------------------------------ MrT5
def test_delete_gate_formula_and_regulariser():
    torch.manual_seed(1)
    gate = MrT5DeleteGate(D, k=-30.0).double()
    h = torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    g = gate(h, mask)
    expected = -30.0 * torch.sigmoid(
        gate.proj(nn.functional.layer_norm(h, (D,), gate.norm.weight, gate.norm.bias))
    )
    torch.testing.assert_close(g[0], expected[0, :, 0], rtol=0, atol=1e-12)
    assert (g[1, 3:] == -30.0).all() and (g > -30.0 - 1e-12).all() and (g <= 0).all()
    assert gate.regularizer(g, mask).item() == pytest.approx(g[mask.bool()].mean().item())
    assert gate.threshold == -15.0
    assert gate.deletion_rate(g, mask) == pytest.approx((g[mask.bool()] < -15).double().mean().item())
    at = torch.tensor([[-15.0, -14.0, -16.0, -30.0]], dtype=torch.float64)  # G = k/2 is not "G < k/2"
    assert gate.keep_mask(at).tolist() == [[True, True, False, False]]
    assert gate.deletion_rate(at) == 0.5  # the same positions as hard deletion removes


def test_gate_that_keeps_everything_equals_the_plain_encoder():
    stack = layers(3, torch.float64).eval()
    gate = MrT5DeleteGate(D).double()
    nn.init.constant_(gate.proj.bias, -1e4)  # σ(−10⁴) = 0: G = 0 everywhere
    encoder = DeleteGateEncoder(stack, 1, gate)
    h = torch.randn(2, 7, D, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    plain = h
    with torch.no_grad():
        for layer in stack:
            plain = layer(plain, src_key_padding_mask=~mask.bool())
        for hard in (False, True):
            out = encoder(h, mask, hard=hard)
            assert out.hidden.shape == h.shape and torch.equal(out.attention_mask, mask.bool())
            torch.testing.assert_close(out.hidden[mask.bool()], plain[mask.bool()], rtol=0, atol=1e-12)


def test_soft_deletion_tends_to_hard_deletion():
    """With the gate at 0 (keep) or at a floor k → −∞ (delete), the kept positions' outputs of soft
    deletion equal those of hard deletion (the later layers never see a deleted key)."""
    stack = layers(3, torch.float64).eval()
    gate = MrT5DeleteGate(D, k=-200.0).double()
    delete = torch.tensor([[0, 1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    gate.forward = lambda hidden, mask: torch.where(delete, -200.0, 0.0).double().masked_fill(~mask, -200.0)
    encoder = DeleteGateEncoder(stack, 2, gate)
    h = torch.randn(2, 7, D, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 6 + [0]]).bool()
    with torch.no_grad():
        soft, hard = encoder(h, mask, hard=False), encoder(h, mask, hard=True)
    keep = ~delete & mask
    assert hard.hidden.shape[1] == int(keep.sum(1).max())
    for row in range(2):
        kept = keep[row].nonzero().squeeze(1)
        assert hard.positions[row, : len(kept)].tolist() == kept.tolist()
        torch.testing.assert_close(hard.hidden[row, : len(kept)], soft.hidden[row, kept], rtol=0, atol=1e-10)


def test_delete_gate_encoder_trains(byte_batches):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(256, D), nn.Linear(D, 256)
            self.encoder = DeleteGateEncoder(layers(2), 1, MrT5DeleteGate(D), causal=True)

        def forward(self, x):
            return self.encoder(self.embed(x))

    def loss_fn(model, batch):
        out = model(batch[:, :-1])
        ce = nn.functional.cross_entropy(model.out(out.hidden).transpose(1, 2), batch[:, 1:])
        return ce + 0.01 * model.encoder.gate.regularizer(out.gate)

    model = Model().train()
    before = model.encoder.gate.proj.weight.detach().clone()
    first, last = train(model, loss_fn, byte_batches)
    assert last < first - 1.0, (first, last)
    assert not torch.equal(model.encoder.gate.proj.weight, before)  # the gate is trained too


# ----------------------------------------------------------------------------------------- H-Net
def test_boundary_rule_equals_the_formula():
    chunker = DynamicChunking(4).double()
    e1, e2 = torch.eye(4, dtype=torch.float64)[:2]
    x = torch.stack([e1, 2 * e1, -e1, e2, e2 + 0.1 * e1])[None]
    p = chunker.boundary_probability(x)[0]
    cos = torch.nn.functional.cosine_similarity(e2 + 0.1 * e1, e2, dim=0)
    expected = torch.stack([p.new_tensor(v) for v in (1.0, 0.0, 1.0, 0.5)] + [(1 - cos) / 2])
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
    routed = chunker(x)
    assert routed.boundary_mask[0].tolist() == [True, False, True, True, False]  # p ≥ ½ (0.5 included)
    assert torch.equal(routed.chunks[0], x[0, [0, 2, 3]])
    torch.manual_seed(2)
    nn.init.normal_(chunker.q.weight)
    nn.init.normal_(chunker.k.weight)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    p = chunker.boundary_probability(x)
    q, k = x @ chunker.q.weight.T, x @ chunker.k.weight.T
    for t in range(1, 6):
        cos = (q[:, t] * k[:, t - 1]).sum(-1) / (q[:, t].norm(dim=-1) * k[:, t - 1].norm(dim=-1))
        torch.testing.assert_close(p[:, t], (1 - cos) / 2, rtol=0, atol=1e-12)


def test_upsample_is_the_smoothed_repeat_and_inverts_downsampling():
    torch.manual_seed(3)
    chunker = DynamicChunking(4).double()
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2])
    routed = chunker(x, mask)
    z = torch.randn(routed.chunks.shape, dtype=torch.float64)
    out = chunker.upsample(z, routed)
    for row in range(2):  # reference: the EMA by a loop, each position takes its chunk's value
        starts = routed.boundary_mask[row].nonzero().squeeze(1).tolist()
        state = torch.zeros(4, dtype=torch.float64)
        smoothed = []
        for j, start in enumerate(starts):
            big_p = routed.boundary_prob[row, start].clamp(1e-4, 1 - 1e-4)
            state = big_p * z[row, j] + (1 - big_p) * state
            smoothed.append(state)
        for t in range(int(mask[row].sum())):
            j = sum(s <= t for s in starts) - 1
            torch.testing.assert_close(out[row, t], smoothed[j], rtol=0, atol=1e-12)  # STE: forward × 1
    out.sum().backward()
    assert chunker.q.weight.grad is not None and chunker.q.weight.grad.abs().sum() > 0  # through c_t
    # certain boundaries (p → 1 at each chunk start) and certain continuations (p → 0 inside):
    # downsample then upsample returns every position's chunk-start vector
    e = torch.eye(4, dtype=torch.float64)
    x = torch.stack([e[0], 2 * e[0], -e[0], -3 * e[0], e[0]])[None]
    routed = DynamicChunking(4).double()(x)
    back = chunker.upsample(routed.chunks, routed)
    torch.testing.assert_close(back[0], x[0, [0, 0, 2, 2, 4]], rtol=1e-3, atol=0)
    for wrong in (routed.chunks[:, :2], routed.chunks.expand(2, -1, -1)):  # one output per chunk
        with pytest.raises(ValueError, match="`z`"):
            chunker.upsample(wrong, routed)


def test_upsample_gradient_is_the_straight_through_estimate():
    """H-Net's STE: forward ``× 1``, backward the gradient of ``c_t``; the reference builds ``c_t + (1 −
    c_t).detach()`` around a loop EMA from p computed by the formula, and both gradients w.r.t. the
    input (through ``p`` in the confidence and in the smoothing) must agree."""
    torch.manual_seed(5)
    chunker = DynamicChunking(4).double()
    nn.init.normal_(chunker.q.weight)
    nn.init.normal_(chunker.k.weight)
    x = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, 9, 4, dtype=torch.float64)
    w = torch.randn(1, 9, 4, dtype=torch.float64)
    routed = chunker(x)
    (chunker.upsample(z[:, : routed.chunks.shape[1]], routed) * w).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    q, k = x[0] @ chunker.q.weight.T, x[0] @ chunker.k.weight.T
    cos = (q[1:] * k[:-1]).sum(-1) / (q[1:].norm(dim=-1) * k[:-1].norm(dim=-1))
    p = torch.cat([torch.ones(1, dtype=torch.float64), (1 - cos) / 2])
    b = p.detach() >= 0.5
    state, out, j = torch.zeros(4, dtype=torch.float64), [], -1
    for t in range(9):
        if b[t]:
            j += 1
            big_p = p[t].clamp(1e-4, 1 - 1e-4)
            state = big_p * z[0, j] + (1 - big_p) * state
        c = p[t] if b[t] else 1 - p[t]
        out.append(state * (c + (1 - c).detach()))
    (torch.stack(out) * w[0]).sum().backward()
    assert 1 < int(b.sum()) < 9  # some chunks of several positions
    torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-12)


def test_ratio_loss_formula():
    """By hand: the valid positions' p are 1, 0, ½, 0 | 1, ½ and b = 1, 0, 1, 0 | 1, 1, so F = 2/3,
    G = 1/2 and L = 4/3 · (3 · 2/3 · 1/2 + 1/3 · 1/2) = 14/9; the padded positions (p = 0.15, 0.85)
    must not count (with them, F = G = 1/2 and L = 4/3)."""
    chunker = DynamicChunking(2).double()
    x = torch.tensor(
        [[[1.0, 0], [1, 0], [0, 1], [0, 1]], [[1, 0], [0, 1], [5, 5], [-1, 0]]], dtype=torch.float64
    )
    routed = chunker(x, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert chunker.ratio_loss(routed, 4.0).item() == pytest.approx(14 / 9, abs=1e-12)
    with pytest.raises(ValueError, match="`target_ratio`"):
        chunker.ratio_loss(routed, 1.0)


def test_dynamic_chunking_trains(byte_batches):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(256, D), nn.Linear(D, 256)
            self.encoder, self.main, self.decoder = layers(3)
            self.chunker, self.residual = DynamicChunking(D), nn.Linear(D, D)

        def forward(self, x):
            h = self.encoder(self.embed(x), src_mask=causal(x.shape[1]))
            routed = self.chunker(h)
            z = self.main(routed.chunks, src_mask=causal(routed.chunks.shape[1]),
                          src_key_padding_mask=~routed.chunk_mask)  # fmt: skip
            h = self.chunker.upsample(z, routed) + self.residual(h)
            return self.out(self.decoder(h, src_mask=causal(x.shape[1]))), routed

    def loss_fn(model, batch):
        logits, routed = model(batch[:, :-1])
        ce = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
        return ce + 0.03 * model.chunker.ratio_loss(routed, 4.0)

    first, last = train(Model(), loss_fn, byte_batches)
    assert last < first - 1.0, (first, last)


# ------------------------------------------------------------------------------ Learn Your Tokens
def test_word_pooling_and_unpooling():
    assert word_ids_from_text("ab cd  é") == [0, 0, 1, 1, 1, 2, 3, 3, 3]  # "  é": space run, " é"
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, -1, -1]])
    h = torch.randn(2, 6, 3, dtype=torch.float64)
    for mode, pick in [("mean", None), ("first", min), ("last", max)]:
        words, mask = WordPooling(mode)(h, ids)
        assert words.shape == (2, 3, 3) and mask.all()
        for row in range(2):
            for w in range(3):
                positions = (ids[row] == w).nonzero().squeeze(1).tolist()
                expected = h[row, positions].mean(0) if pick is None else h[row, pick(positions)]
                torch.testing.assert_close(words[row, w], expected, rtol=0, atol=1e-12)
    pool = WordPooling()
    words, _ = pool(h, ids)
    back = pool.unpool(words, ids)
    again, _ = pool(back, ids)
    torch.testing.assert_close(again, words, rtol=0, atol=1e-12)  # unpool∘pool = id on word vectors
    shifted = pool.unpool(words, ids, shift=True)
    assert (shifted[:, :2][ids[:, :2] == 0] == 0).all()  # the first word sees no earlier word
    torch.testing.assert_close(shifted[0, 2], words[0, 0], rtol=0, atol=0)
    assert (shifted[1, 4:] == 0).all()  # padding
    with pytest.raises(ValueError, match="`word_ids`"):
        pool(h, ids[:, :5])  # one word id per position: a shorter map pooled only a prefix, silently
    with pytest.raises(ValueError, match="`word_ids`"):
        pool.unpool(words[:, :2], ids)  # word 2 has no vector: its bytes silently got zeros


def test_word_pooled_model_trains(byte_batches):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(256, D), nn.Linear(D, 256)
            self.bytes, self.words = layers(2)
            self.pool = WordPooling("mean")

        def forward(self, x, ids):
            h = self.embed(x)
            words, _ = self.pool(h, ids)
            ctx = self.words(words, src_mask=causal(words.shape[1]))  # word-level model, causal
            h = h + self.pool.unpool(ctx, ids, shift=True)  # bytes of word w see words < w
            return self.out(self.bytes(h, src_mask=causal(x.shape[1])))

    def loss_fn(model, batch):
        ids = torch.tensor(
            [word_ids_from_text(bytes(row.tolist()).decode("latin-1")) for row in batch[:, :-1]]
        )
        logits = model(batch[:, :-1], ids)
        return nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:])

    first, last = train(Model(), loss_fn, byte_batches)
    assert last < first - 1.0, (first, last)


# ---------------------------------------------------------------------------------- Lexinvariant
def test_lexinvariant_embeddings_and_vocabulary_permutation_invariance():
    embed = LexinvariantEmbedding(50, D)
    x = torch.tensor([[3, 7, 3, 9, 7, 7], [1, 2, 3, 4, 5, 1]])
    e = embed(x, [11, 12])
    torch.testing.assert_close(e[0, 0], e[0, 2], rtol=0, atol=0)  # same token, same vector
    assert not torch.allclose(e[0, 0], e[0, 1])
    assert not torch.allclose(embed(x, [13, 12])[0, 0], e[0, 0])  # another seed, another vector
    stack = layers(2, torch.float64).eval()
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(4))

    def loss(ids):
        h = stack[1](stack[0](embed(ids, [11, 12]).double(), src_mask=causal(6)), src_mask=causal(6))
        logits = embed.logits(h, ids, [11, 12])
        return h, nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:])

    with torch.no_grad():
        (h, base), (h_perm, permuted) = loss(x), loss(perm[x])
    assert torch.equal(h, h_perm)  # identical hidden states
    assert permuted.item() == pytest.approx(base.item(), rel=1e-12)  # and loss, absent ids included


def test_lexinvariant_model_trains(tiny_world):
    ids = tiny_world.train_ids[: 64 * 48].view(64, 48)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = LexinvariantEmbedding(len(tiny_world.tokenizer), D)
            self.stack = layers(2)

    def loss_fn(model, batch):
        seeds = torch.randint(0, 2**31, (batch.shape[0],)).tolist()
        x = model.embed(batch, seeds)[:, :-1]  # the sequence's own matrix, seen causally
        h = model.stack[1](model.stack[0](x, src_mask=causal(47)), src_mask=causal(47))
        logits = model.embed.logits(h, batch, seeds)
        return nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:])

    first, last = train(Model(), loss_fn, list(ids.split(8)))
    assert last < first - 0.5, (first, last)
