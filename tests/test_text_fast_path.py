"""The text tower's exact FLOP cuts: the last block on the EOT row only, and padding trimmed to the longest caption.

Shapes: B batch, L context length, D width, E embed dim. Tiny towers, fp32, CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from subprocess_runs import records
from test_models import _randomize

import evaclip.data.transforms
from evaclip.data.transforms import trim_padding
from evaclip.models.attention import Attend
from evaclip.models.registry import TextCfg
from evaclip.models.text import TextAttention, TextTransformer
from evaclip.train import main

CFG = TextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=3)
EOT = CFG.vocab_size - 1


def _tower(backend: str, seed: int = 0) -> TextTransformer:
    torch.manual_seed(seed)
    tower = TextTransformer(CFG, embed_dim=24, attend=Attend(backend))
    _randomize(tower, 0.2)  # larger than CLIP's init so every block visibly shapes the output
    return tower


def _tokens(eot_positions, L: int = CFG.context_length, seed: int = 0) -> torch.Tensor:
    """CLIP-shaped ids: SOT, random words, EOT (the highest id) at the given positions, zero padding after."""
    g = torch.Generator().manual_seed(seed)
    tokens_BL = torch.randint(1, EOT - 1, (len(eot_positions), L), generator=g)
    tokens_BL[:, 0] = EOT - 1
    for b, e in enumerate(eot_positions):
        tokens_BL[b, e], tokens_BL[b, e + 1:] = EOT, 0
    return tokens_BL


def _reference(tower: TextTransformer, tokens_BL: torch.Tensor) -> torch.Tensor:
    """The full computation: every block on every token, ln_final, gather at EOT (argmax), project."""
    L = tokens_BL.shape[1]
    x_BLD = tower.token_embedding(tokens_BL) + tower.positional_embedding[:L]
    for blk in tower.transformer.resblocks:
        x_BLD = blk(x_BLD)
    x_BLD = tower.ln_final(x_BLD)
    return x_BLD[torch.arange(len(tokens_BL)), tokens_BL.argmax(dim=-1)] @ tower.text_projection


# EOT rows at the very start, in the middle, and one caption filling the whole context (no padding)
MIXED = [1, 5, CFG.context_length - 1, 9]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_eot_only_last_block_same_features_and_gradients(backend, grad_checkpointing):
    fast = _tower(backend).train()
    fast.set_grad_checkpointing(grad_checkpointing)
    ref = copy.deepcopy(fast)
    tokens_BL = _tokens(MIXED)
    w_BE = torch.randn(len(MIXED), 24)
    f_fast, f_ref = fast(tokens_BL), _reference(ref, tokens_BL)
    torch.testing.assert_close(f_fast, f_ref, rtol=1e-5, atol=1e-5)
    (f_fast * w_BE).sum().backward()
    (f_ref * w_BE).sum().backward()
    names = [n for n, _ in fast.named_parameters()]
    assert any(".resblocks.2." in n for n in names)  # the last block's parameters are among those checked
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_grad_checkpointing_recomputes_the_eot_only_block():
    """With checkpointing the last block runs again in backward, on the same EOT rows (not the full sequence)."""
    tower = _tower("sdpa").train()
    tower.set_grad_checkpointing(True)
    last = tower.transformer.resblocks[-1].attn
    calls = []
    orig = last.forward_rows
    last.forward_rows = lambda x_BLD, row_B: calls.append(row_B.clone()) or orig(x_BLD, row_B)
    tokens_BL = _tokens(MIXED)
    tower(tokens_BL).sum().backward()
    assert len(calls) == 2 and all(torch.equal(c, tokens_BL.argmax(-1)) for c in calls)


def test_forward_tokens_is_the_full_computation():
    tower = _tower("sdpa").eval()
    tokens_BL = _tokens(MIXED)
    x_BLD = tower.forward_tokens(tokens_BL)
    assert x_BLD.shape == (len(MIXED), CFG.context_length, CFG.width)
    pooled_BE = x_BLD[torch.arange(len(MIXED)), tokens_BL.argmax(-1)] @ tower.text_projection
    torch.testing.assert_close(pooled_BE, tower(tokens_BL), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout_backend", ["eager", "flash_attn"])
def test_one_query_rows_match_the_causal_rows_in_each_layout(layout_backend):
    """forward_rows == rows of the causal forward; the flash_attn layout (BNHD) routes the masked call through SDPA,
    so it runs on a CPU too."""
    torch.manual_seed(0)
    full = TextAttention(32, 4, Attend("sdpa"))
    _randomize(full, 0.3)
    rows = TextAttention(32, 4, Attend(layout_backend))
    rows.load_state_dict(full.state_dict())
    x_BLD = torch.randn(3, 11, 32)
    row_B = torch.tensor([0, 10, 4])
    torch.testing.assert_close(rows.forward_rows(x_BLD, row_B), full(x_BLD)[torch.arange(3), row_B],
                               rtol=1e-5, atol=1e-5)


def test_attend_mask_errors_are_clear():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError, match="boolean"):
        Attend("sdpa")(q, q, q, mask=torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="causal"):
        Attend("eager")(q, q, q, causal=True, mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_matches_open_clip_text_transformer():
    from open_clip.model import TextTransformer as OpenClipText

    ours = _tower("sdpa").eval()
    ref = OpenClipText(context_length=CFG.context_length, vocab_size=CFG.vocab_size, width=CFG.width,
                       heads=CFG.heads, layers=CFG.layers, output_dim=24).eval()
    ref.load_state_dict(ours.state_dict())
    tokens_BL = _tokens(MIXED)
    torch.testing.assert_close(ours(tokens_BL), ref(tokens_BL), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(trim_padding(tokens_BL[:2])), ref(tokens_BL[:2]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# trim_padding


@pytest.mark.parametrize("eots,expected", [([1, 2], 8), ([7, 3], 8), ([8, 0], 16), ([20, 5], 24), ([71, 2], 72),
                                           ([72, 2], 77), ([76, 5], 77)])
def test_trim_padding_rounds_to_8_and_never_exceeds_the_input(eots, expected):
    tokens_BL = _tokens(eots, L=77)
    out = trim_padding(tokens_BL)
    assert out.shape == (2, expected) and out.dtype == torch.int64 and out.device.type == "cpu"
    assert torch.equal(out, tokens_BL[:, :expected])
    assert torch.equal(out.argmax(-1), tokens_BL.argmax(-1))  # every EOT kept


def test_trim_padding_full_context_and_custom_multiple():
    full = _tokens([76, 3], L=77)
    assert trim_padding(full) is full  # the longest caption fills the context: nothing to cut
    assert trim_padding(_tokens([4, 2], L=77), multiple=1).shape == (2, 5)
    assert trim_padding(_tokens([4, 2], L=77), multiple=16).shape == (2, 16)
    assert trim_padding(torch.zeros(0, 77, dtype=torch.long)).shape == (0, 77)


@pytest.mark.parametrize("bad,err", [(torch.zeros(77, dtype=torch.long), "B x L"), (torch.zeros(2, 8), "integer"),
                                     ([[1, 2]], "B x L")])
def test_trim_padding_bad_input(bad, err):
    with pytest.raises(ValueError, match=err):
        trim_padding(bad)
    with pytest.raises(ValueError, match="multiple"):
        trim_padding(torch.zeros(2, 8, dtype=torch.long), multiple=0)


@pytest.mark.parametrize("eots", [[1, 5, 2], [3, 9, 4], MIXED])
def test_trimmed_batch_gives_the_same_features(eots):
    tower = _tower("sdpa").eval()
    tokens_BL = _tokens(eots)
    trimmed = trim_padding(tokens_BL)
    assert trimmed.shape[1] == min(CFG.context_length, -(-(max(eots) + 1) // 8) * 8)
    torch.testing.assert_close(tower(trimmed), tower(tokens_BL), rtol=1e-5, atol=1e-6)


def test_train_loop_trims_and_gives_the_same_losses(monkeypatch, run_cfg):
    """Two tiny steps with trimming on and off: the same losses; with it on the text batch really is shorter."""
    seen = []

    def spy(tokens_BL):
        out = trim_padding(tokens_BL)
        seen.append((tokens_BL.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(evaclip.data.transforms, "trim_padding", spy)
    losses = {}
    for trim in (True, False):
        run = main(run_cfg(f"name=trim_{trim}", "max_steps=2", "optim.lr=1e-3", "model.token_drop=0.0",
                           "model.attn_backend=eager", f"data.trim_text_padding={str(trim).lower()}"))
        losses[trim] = [r["train/loss"] for r in records(run.run_dir) if "train/loss" in r]
    assert len(losses[True]) == 2 and len(seen) == 2  # the spy ran in the trimming run only
    assert all(n < full and n % 8 == 0 for full, n in seen)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_eot_only_last_block_on_cuda_bf16(backend):
    """On a GPU in bf16: the masked one-query call goes through SDPA whatever the backend (flash_attn included)."""
    from evaclip.models.attention import flash_attn_usable

    if backend == "flash_attn" and not flash_attn_usable():
        pytest.skip("flash-attn is not installed")
    tower = _tower(backend).cuda().train()
    tokens_BL = _tokens(MIXED).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        f_fast, f_ref = tower(tokens_BL), _reference(tower, tokens_BL)
    torch.testing.assert_close(f_fast.float(), f_ref.float(), rtol=3e-2, atol=3e-2)
