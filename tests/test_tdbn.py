"""tdBN (arXiv 2011.05280 eq. 5-6) against the formula, BatchNorm2d, and a single process on the whole batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from stbp import TdBN, convert_sync_tdbn
from tests._dist import run_ranks


@pytest.mark.parametrize("v_th, alpha", [(0.4, 1.0), (0.4, 1 / math.sqrt(2)), (1.3, 0.5)])
def test_tdbn_at_init_normalises_over_time_batch_and_space_to_std_alpha_vth(v_th, alpha):
    T, N, C, H, W = 3, 4, 5, 6, 6
    x = torch.randn(T, N, C, H, W) * 3 + 2
    bn = TdBN(C, alpha=alpha)
    y = bn(x.flatten(0, 1), v_th).view(T, N, C, H, W)
    mean = y.mean(dim=(0, 1, 3, 4))
    std = y.var(dim=(0, 1, 3, 4), unbiased=False).sqrt()
    torch.testing.assert_close(mean, torch.zeros(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.full((C,), alpha * v_th), atol=1e-4, rtol=0)


def test_tdbn_formula_with_affine_parameters():
    x = torch.randn(8, 3, 4, 4)
    bn = TdBN(3, alpha=0.7, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = bn.weight.view(1, 3, 1, 1) * (0.7 * 0.4 * (x - mean) / torch.sqrt(var + 1e-5)) + bn.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(bn(x, 0.4), expected, atol=1e-5, rtol=1e-5)


def test_tdbn_eval_uses_running_stats_and_state_dict_round_trips():
    bn = TdBN(4, momentum=0.5)
    for _ in range(3):
        bn(torch.randn(16, 4, 3, 3) * 2 + 1, 0.5)
    assert not torch.allclose(bn.running_mean, torch.zeros(4))
    bn.eval()
    x = torch.randn(2, 4, 3, 3)
    expected = (x - bn.running_mean.view(1, 4, 1, 1)) / torch.sqrt(bn.running_var.view(1, 4, 1, 1) + bn.eps)
    expected = expected * 0.5 * bn.weight.view(1, 4, 1, 1) + bn.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(bn(x, 0.5), expected)

    state = bn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    other = TdBN(4)
    other.load_state_dict(state)
    other.eval()
    torch.testing.assert_close(other(x, 0.5), bn(x, 0.5))


def test_tdbn_running_stats_match_batchnorm2d():
    torch.manual_seed(0)
    bn, ref = TdBN(3), torch.nn.BatchNorm2d(3)
    for _ in range(4):
        x = torch.randn(10, 3, 5, 5) * 2 - 1
        bn(x, 0.4)
        ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_tdbn_rejects_non_folded_input():
    with pytest.raises(ValueError, match=r"\[T\*N, C, H, W\]"):
        TdBN(3)(torch.randn(2, 2, 3, 4, 4), 0.4)


def _loss(y: torch.Tensor) -> torch.Tensor:
    # A fixed, non-symmetric function of the output, summed (not averaged) so per-rank losses add up exactly.
    w = torch.linspace(-1, 2, y[0].numel()).view_as(y[0])
    return (y * w).sum() + (y**2).sum() * 0.1


def _synced_rank(rank, world, x_all, result_path):
    torch.manual_seed(0)
    bn = convert_sync_tdbn(TdBN(x_all.shape[1], alpha=0.7, momentum=0.3))
    with torch.no_grad():
        bn.weight.mul_(1.5)
        bn.bias.add_(0.2)
    x = x_all.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(x, 0.4)
    _loss(y).backward()
    params = torch.cat([bn.weight.grad, bn.bias.grad])
    torch.distributed.all_reduce(params)  # what DDP does with gradients (as a sum here)
    torch.save(
        {
            "y": y.detach(),
            "grad_x": x.grad,
            "grad_params": params,
            "running_mean": bn.running_mean,
            "running_var": bn.running_var,
        },
        f"{result_path}.{rank}",
    )


def test_synced_tdbn_over_two_gloo_ranks_equals_one_rank_on_concatenated_batch(tmp_path):
    torch.manual_seed(1)
    x_all = torch.randn(12, 3, 4, 4) * 2 + 0.5
    out = tmp_path / "r"
    run_ranks(_synced_rank, 2, x_all, str(out))
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]

    # Oracle: one plain (unsynced) tdBN on the whole batch.
    torch.manual_seed(0)
    bn = TdBN(3, alpha=0.7, momentum=0.3)
    with torch.no_grad():
        bn.weight.mul_(1.5)
        bn.bias.add_(0.2)
    x = x_all.clone().requires_grad_(True)
    y = bn(x, 0.4)
    _loss_parts = [_loss(part) for part in y.chunk(2)]
    sum(_loss_parts).backward()

    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), x.grad, atol=1e-5, rtol=1e-4)
    for r in ranks:
        torch.testing.assert_close(r["grad_params"], torch.cat([bn.weight.grad, bn.bias.grad]), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(r["running_mean"], bn.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["running_var"], bn.running_var, atol=1e-6, rtol=1e-5)


def _unsynced_rank(rank, world, x_all, result_path):
    bn = TdBN(x_all.shape[1])
    y = bn(x_all.chunk(world)[rank], 0.4)
    torch.save({"y": y.detach()}, f"{result_path}.{rank}")


def test_unsynced_tdbn_under_two_ranks_uses_local_statistics(tmp_path):
    # The control for the test above: without sync each rank normalises its own shard, which differs.
    x_all = torch.cat([torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3) * 3 + 4])
    out = tmp_path / "r"
    run_ranks(_unsynced_rank, 2, x_all, str(out))
    y = torch.cat([torch.load(f"{out}.{r}", weights_only=True)["y"] for r in range(2)])
    assert not torch.allclose(y, F.batch_norm(x_all, None, None, training=True) * 0.4, atol=1e-3)


def test_tdbn_stores_no_threshold_and_takes_the_driven_lifs_at_every_call():
    """The threshold lives in the LIF (:meth:`LIF.threshold`); a tdBN is told it, a float or a learned tensor."""
    from stbp import LIF

    bn = TdBN(3, alpha=0.5)
    assert not hasattr(bn, "v_th") and "v_th" not in bn.extra_repr()
    with pytest.raises(TypeError):
        TdBN(3, v_th=0.4)  # the old keyword is refused, not ignored
    with pytest.raises(TypeError):
        TdBN(3, 0.4)  # nor taken for alpha
    x = torch.randn(16, 3, 4, 4) * 3 + 1
    with pytest.raises(TypeError):
        bn(x)  # always told
    for lif in (
        LIF(v_th=0.3),
        LIF(v_th=0.3, learn_v_th=True),
        LIF(v_th=0.3, learn_v_th=True, v_th_granularity="channel", channels=3),
    ):
        y = bn(x, lif.threshold())
        std = y.detach().transpose(0, 1).flatten(1).std(1, unbiased=False)
        torch.testing.assert_close(std, torch.full((3,), 0.5 * 0.3), rtol=1e-4, atol=1e-5)
