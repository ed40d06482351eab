"""Sinkhorn-Knopp codes: marginals, numerical robustness, dtypes, and the distributed path."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medclust.errors import MedclustError
from medclust.losses import MemoryBank, Sinkhorn, sinkhorn, spherical_kmeans


def _scores(b=24, k=10, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g) * scale


def test_marginals_before_and_after_rescale():
    s = _scores(32, 8)
    plan = sinkhorn(s, epsilon=0.05, iterations=200, rescale=False)
    torch.testing.assert_close(plan.sum(1), torch.full((32,), 1 / 32))  # exact: last step is a row step
    torch.testing.assert_close(plan.sum(0), torch.full((8,), 1 / 8), atol=1e-4, rtol=0)
    codes = sinkhorn(s, epsilon=0.05, iterations=3)
    torch.testing.assert_close(codes.sum(1), torch.ones(32))
    assert codes.dtype == torch.float32 and not codes.requires_grad
    # few iterations: rows exact; columns move towards the equal partition as iterations grow
    dev = []
    for it in (0, 3, 30):
        p = sinkhorn(s, epsilon=0.05, iterations=it, rescale=False)
        torch.testing.assert_close(p.sum(1), torch.full((32,), 1 / 32))
        dev.append(float((p.sum(0) - 1 / 8).abs().max()))
    assert dev[2] < dev[1]


def test_equal_partition_spreads_a_collapsed_batch():
    # every sample prefers prototype 0; codes must still use all prototypes equally
    s = torch.zeros(40, 4)
    s[:, 0] = 1.0
    s += 0.01 * _scores(40, 4)
    codes = sinkhorn(s, epsilon=0.05, iterations=50)
    torch.testing.assert_close(codes.sum(0), torch.full((4,), 10.0), atol=1e-2, rtol=0)


@pytest.mark.parametrize("scores", [
    torch.full((16, 5), 1e4),
    torch.full((16, 5), -1e4),
    torch.zeros(16, 5),
    _scores(16, 5, scale=1e4),
    torch.cat([torch.full((8, 5), 1e4), torch.full((8, 5), -1e4)]),
])
def test_no_nan_on_extreme_or_constant_scores(scores):
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(16))
    if scores.std() == 0:
        torch.testing.assert_close(codes, torch.full_like(codes, 1 / 5))


def test_half_precision_and_autocast_inputs_computed_in_float32():
    s = _scores(20, 6)
    ref = sinkhorn(s, 0.05, 3)
    for dt in (torch.float16, torch.bfloat16):
        out = sinkhorn(s.to(dt), 0.05, 3)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=0.05, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn(s, 0.05, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(Sinkhorn(0.05, 3)(s), ref)


def test_bad_arguments():
    with pytest.raises(MedclustError, match="epsilon"):
        sinkhorn(_scores(), epsilon=0.0)
    with pytest.raises(MedclustError, match=r"\(B, K\)"):
        sinkhorn(torch.zeros(3, 4, 5))


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = _scores(12, 5, seed=7)
        local = s[rank * 6 : (rank + 1) * 6]
        codes = sinkhorn(local, 0.05, 3)  # auto-detects the process group
        plan = sinkhorn(local, 0.05, 3, rescale=False)
        f = torch.nn.functional.normalize(_scores(40, 6, seed=8), dim=1)
        init = f[:4].clone()
        cent, assign = spherical_kmeans(f[rank * 20 : (rank + 1) * 20], 4, iterations=5, init=init)
        bank = MemoryBank(32, 6)
        bank.add(f[rank * 20 : (rank + 1) * 20], torch.arange(rank * 20, (rank + 1) * 20))
        _, table = bank.cluster(4, num_items=40, iterations=5, seed=0)
        torch.save({"codes": codes, "plan": plan, "cent": cent, "assign": assign, "table": table},
                   f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="uses fork to start ranks quickly")
def test_distributed_matches_single_process_on_the_global_batch():
    # fork, not spawn: children skip re-importing torch (0.2 s instead of ~7 s on 2 cores)
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.start_processes(_ddp_worker, args=(2, init, out), nprocs=2, join=True, start_method="fork")
        res = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    s = _scores(12, 5, seed=7)
    ref = sinkhorn(s, 0.05, 3, distributed=False)
    torch.testing.assert_close(torch.cat([r["codes"] for r in res]), ref, atol=1e-5, rtol=1e-5)
    plan = torch.cat([r["plan"] for r in res])
    torch.testing.assert_close(plan.sum(1), torch.full((12,), 1 / 12))  # B is the GLOBAL batch

    f = torch.nn.functional.normalize(_scores(40, 6, seed=8), dim=1)
    cent, assign = spherical_kmeans(f, 4, iterations=5, init=f[:4].clone(), distributed=False)
    for r in res:
        torch.testing.assert_close(r["cent"], cent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["assign"] for r in res]), assign)
    # every rank gets the full item -> cluster table, combined over ranks
    assert (res[0]["table"] >= 0).all()
    torch.testing.assert_close(res[0]["table"], res[1]["table"])
