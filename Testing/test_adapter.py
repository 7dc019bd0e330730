"""The slice-pooling adapter and the global-average-pooling baseline."""
import pytest
import torch
import torch.nn.functional as F

from RadCLIPCore import AdapterConfig, SlicePoolingAdapter, mean_pool


@pytest.fixture
def adapter():
    torch.manual_seed(0)
    return SlicePoolingAdapter(AdapterConfig(dim=32, num_heads=4, pos_anchors=8, dropout=0.5)).eval()


def test_weights_sum_to_one_and_embedding_is_unit_norm(adapter):
    emb, w = adapter(F.normalize(torch.randn(3, 17, 32), dim=-1))
    assert emb.shape == (3, 32) and w.shape == (3, 17)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert (w > 0).all()


def test_padding_is_ignored(adapter):
    short, long = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    padded = torch.zeros(2, 9, 32)
    padded[0, :5], padded[1] = short[0], long[0]
    padded[0, 5:] = 1e3  # garbage in the padding must not matter
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True
    emb, w = adapter(padded, mask)
    emb_short, w_short = adapter(short)
    emb_long, _ = adapter(long)
    torch.testing.assert_close(emb[0], emb_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w[0, :5], w_short[0], atol=1e-6, rtol=1e-5)
    assert (w[0, 5:] == 0).all()
    torch.testing.assert_close(emb[1], emb_long[0], atol=1e-5, rtol=1e-5)


def test_positional_encoding_is_defined_for_any_length(adapter):
    for n in (1, 2, 7, 8, 64, 500):
        pe = adapter.positional_encoding(torch.tensor([n]), n)
        assert pe.shape == (1, n, 32) and torch.isfinite(pe).all()
    # relative depth: the first and last slices get the first and last anchors whatever n is
    pe = adapter.positional_encoding(torch.tensor([300]), 300)
    torch.testing.assert_close(pe[0, 0], adapter.pos[0])
    torch.testing.assert_close(pe[0, -1], adapter.pos[-1])


def test_positions_change_the_result(adapter):
    x = torch.randn(1, 6, 32)
    _, w = adapter(x)
    _, w_rev = adapter(x.flip(1))
    assert not torch.allclose(w, w_rev.flip(1))  # order matters, through the positional encoding


def test_mean_mode_is_the_arithmetic_mean():
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    emb, w = mean_pool(x, mask)
    torch.testing.assert_close(emb[0], F.normalize(x[0].mean(0), dim=0))
    torch.testing.assert_close(emb[1], F.normalize(x[1, :4].mean(0), dim=0))
    torch.testing.assert_close(w[1], torch.tensor([0.25] * 4 + [0.0] * 2))


def test_dropout_acts_only_in_training(adapter):
    x = torch.randn(1, 10, 32)
    torch.testing.assert_close(adapter(x)[0], adapter(x)[0])
    adapter.train()
    torch.manual_seed(1)
    a = adapter(x)[0]
    b = adapter(x)[0]
    assert not torch.allclose(a, b)


def test_adapter_is_trainable(adapter):
    adapter.train()
    x = torch.randn(4, 8, 32)
    target = F.normalize(torch.randn(4, 32), dim=-1)
    emb, _ = adapter(x)
    (1 - (emb * target).sum(-1)).mean().backward()
    for name in ("pos", "pool_query", "proj.weight", "attn.in_proj_weight"):
        assert dict(adapter.named_parameters())[name].grad.abs().sum() > 0, name


def test_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        SlicePoolingAdapter(AdapterConfig(dim=30, num_heads=4))
