"""Data parallelism: 2 CPU processes (gloo) reproduce the single-process operator on the union of batches."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import BatchHessianOperator, DenseOperator, make_batches, make_mlp

from hessian_tools import UserError
from hessian_tools.distributed import DistributedOperator, init_distributed
from hessian_tools.estimators import hutchinson_trace, lanczos

N_BATCHES = 5  # uneven shares (3 and 2 batches of different sizes): the weighting must be exact


def probe(n):
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float64)


def worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, batches = make_mlp(), make_batches(N_BATCHES)
        op = DistributedOperator(lambda share: BatchHessianOperator(model, share), batches)
        hv = op.matvec(probe(op.shape[0]))
        est = lanczos(op, k=1, which="both", tol=1e-10)
        trace = hutchinson_trace(op, n_samples=6, seed=0)
        np.savez(f"{out_dir}/rank{rank}.npz", hv=hv.numpy(), eigs=est.payload["eigenvalues"],
                 hvps=[est.hvp_count, op.local.hvp_count], trace=trace.value,
                 weights=[op.total_weight, op.local.total_weight], world=op.settings()["world_size"])
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_match_single_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    model, batches = make_mlp(), make_batches(N_BATCHES)
    single = BatchHessianOperator(model, batches)
    hv = single.matvec(probe(single.shape[0])).numpy()
    est = lanczos(single, k=1, which="both", tol=1e-10)
    trace = hutchinson_trace(BatchHessianOperator(model, batches), n_samples=6, seed=0)
    for r in ranks:
        np.testing.assert_allclose(r["hv"], hv, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(r["eigs"], est.payload["eigenvalues"], rtol=1e-10)
        assert r["trace"] == pytest.approx(trace.value, rel=1e-10)
        assert r["weights"][0] == single.total_weight and int(r["world"]) == 2
    # Identical Krylov iterations on both ranks: the same bits and the same number of products.
    np.testing.assert_array_equal(ranks[0]["eigs"], ranks[1]["eigs"])
    np.testing.assert_array_equal(ranks[0]["hvps"], ranks[1]["hvps"])
    assert ranks[0]["weights"][1] + ranks[1]["weights"][1] == single.total_weight
    assert ranks[0]["weights"][1] != ranks[1]["weights"][1]


def test_needs_an_initialised_process_group():
    with pytest.raises(UserError, match="not initialised"):
        DistributedOperator(lambda b: DenseOperator(np.eye(2)), [0, 1])


def test_init_outside_torchrun_raises_user_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="launch with torchrun"):
        init_distributed()


ACT_SIZES = (2, 1, 3, 1, 2)  # five batches of different sizes: uneven shares, uneven blocks
ACT_SITE = "layers.0.feed_forward:in"


def act_worker(rank, world_size, port, out_dir):
    from operator_refs import tiny_gpt, token_batches

    from hessian_tools.distributed import DistributedBlockOperator
    from hessian_tools.operators import ActivationHessian

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, batches = tiny_gpt("simplegpt"), token_batches(ACT_SIZES)
        op = DistributedBlockOperator(lambda share: ActivationHessian(model, share, ACT_SITE), batches)
        hv = op.matvec(probe(op.shape[0]))
        est = lanczos(op, k=1, which="both", tol=1e-10)
        np.savez(f"{out_dir}/act{rank}.npz", hv=hv.numpy(), eigs=est.payload["eigenvalues"], mine=op.mine,
                 local_hvps=op.local.hvp_count, n=op.shape[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_activation_blocks_on_two_processes_match_single_process(tmp_path):
    from operator_refs import tiny_gpt, token_batches

    from hessian_tools.operators import ActivationHessian

    mp.spawn(act_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"act{r}.npz") for r in range(2)]
    single = ActivationHessian(tiny_gpt("simplegpt"), token_batches(ACT_SIZES), ACT_SITE)
    hv = single.matvec(probe(single.shape[0])).numpy()
    est = lanczos(single, k=1, which="both", tol=1e-10)
    for r in ranks:
        assert int(r["n"]) == single.shape[0]
        np.testing.assert_allclose(r["hv"], hv, rtol=1e-8, atol=1e-12 * np.abs(hv).max())
        np.testing.assert_allclose(r["eigs"], est.payload["eigenvalues"], rtol=1e-8)
    assert list(ranks[0]["mine"]) == [0, 2, 4] and list(ranks[1]["mine"]) == [1, 3]
    np.testing.assert_array_equal(ranks[0]["eigs"], ranks[1]["eigs"])  # the same Krylov iteration on both ranks
