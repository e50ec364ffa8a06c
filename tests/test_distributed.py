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


ACT_SIZES = (2, 1, 3, 1, 2)  # five batches of different sizes: uneven shares (7 and 2 rows), uneven blocks
ACT_SITE = "layers.0.feed_forward:in"  # 16 activations per token: n = 9 x 6 x 16 = 864, local_n 672 and 192
BASIS_STEPS = 20


def act_estimates(op, record=lambda mark: None) -> dict:
    """Every sharded estimator on `op` (sharded or single-process), as arrays; record() marks where the
    communication before it was measured."""
    from hessian_tools.estimators import _common as c
    from hessian_tools.estimators import hutchpp_trace, power_iteration, slq_density, spectral_norm, xtrace_trace
    from hessian_tools.estimators.krylov import KrylovBasis

    out = {}
    x = probe(op.shape[0])
    out["hv"], out["hV"] = op.matvec(c.local(op, x)), op.matmat(c.local(op, torch.stack([x, x**2], dim=1)))
    record("products")
    est = lanczos(op, k=1, which="both", tol=1e-10, return_vectors=True)
    out.update(eigs=est.payload["eigenvalues"], interval=est.payload["interval"], steps=est.payload["steps"],
               ritz=est.vectors)
    stored32 = lanczos(op, tol=1e-8, basis_dtype=torch.float32)  # the storage's rounding, all-reduced
    out.update(stored32=[stored32.value, *stored32.payload["interval"]])
    sn = spectral_norm(op, tol=1e-10)
    out.update(norm=sn.value, norm_interval=sn.payload["interval"])
    pw = power_iteration(op, tol=1e-9, max_iter=400, return_vectors=True)
    out.update(power=pw.value, power_interval=pw.payload["interval"], power_vector=pw.vectors[:, 0])
    hu, hpp = hutchinson_trace(op, n_samples=6, seed=0), hutchpp_trace(op, n_matvecs=30, seed=0)
    out.update(hutchinson=[hu.value, hu.error], hutchpp=[hpp.value, hpp.error])
    xt = xtrace_trace(op, n_matvecs=12, seed=0)  # 6 probes: its collectives stay below local_n
    out.update(xtrace=[xt.value, xt.error, *xt.payload["loo_estimates"]])
    slq = slq_density(op, n_probes=2, n_iter=12, grid=(-1.0, 1.0, 51), seed=0)
    out.update(slq_moments=slq.payload["moments"], slq_density=slq.payload["density"])
    basis = KrylovBasis(op, c.gaussian(op, c.generator(0)), BASIS_STEPS)
    for _ in range(BASIS_STEPS):
        basis.step()
    out.update(alpha=basis.alpha, beta=basis.beta, basis_shapes=[tuple(b.shape) for b in basis.blocks])
    record("estimators")
    warm = lanczos(op, tol=1e-8, v0=probe(op.shape[0]))
    out.update(warm=[warm.value, *warm.payload["interval"]])
    return out


def act_worker(rank, world_size, port, out_dir):
    from operator_refs import tiny_gpt, token_batches

    from hessian_tools.distributed import ShardedBlockOperator
    from hessian_tools.estimators import _common as c
    from hessian_tools.operators import ActivationHessian

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, batches = tiny_gpt("simplegpt"), token_batches(ACT_SIZES)
        op = ShardedBlockOperator(lambda share: ActivationHessian(model, share, ACT_SITE), batches)
        sizes, marks = [], {}  # entries each collective sends from this rank; how many collectives before each mark
        for name in ("all_reduce", "all_gather"):
            collective = getattr(dist, name)

            def counted(*args, collective=collective, **kwargs):
                sizes.append(args[-1].numel() if isinstance(args[0], list) else args[0].numel())
                return collective(*args, **kwargs)

            setattr(dist, name, counted)
        out = act_estimates(op, lambda mark: marks.setdefault(mark, len(sizes)))
        warm_shard = lanczos(op, tol=1e-8, v0=c.local(op, probe(op.shape[0])))  # v0 as this rank's shard
        out.update(warm_shard=[warm_shard.value, *warm_shard.payload["interval"]])
        budgeted = lanczos(op, tol=1e-8, basis_budget=8 * 11 * 7 * 96)  # 11 float64 rows of rank 0's local_n
        out.update(budget_steps=budgeted.settings["max_iter"])
        np.savez(f"{out_dir}/act{rank}.npz", **{k: np.asarray(v) for k, v in out.items()}, mine=op.mine,
                 spans=op.shard.spans, local_n=op.shard.local_n, n=op.shape[0], product_collectives=marks["products"],
                 estimator_sizes=sizes[marks["products"]: marks["estimators"]])
    finally:
        dist.destroy_process_group()


def whole(ranks, key):
    """The full vector (or rows of a matrix) from every rank's shard of it."""
    parts = [(off, r[key][at: at + size]) for r in ranks
             for (off, size), at in zip(r["spans"], np.cumsum([0, *r["spans"][:, 1]]))]
    return np.concatenate([part for _, part in sorted(parts, key=lambda p: p[0])])


def same_up_to_sign(x, y):
    """x with each column's sign flipped to agree with y's (eigenvectors are defined up to sign)."""
    return x * np.sign((x * y).sum(axis=0))


@pytest.mark.distributed
def test_sharded_activation_estimators_on_two_processes_match_single_process(tmp_path):
    from operator_refs import tiny_gpt, token_batches

    from hessian_tools.operators import ActivationHessian

    mp.spawn(act_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"act{r}.npz") for r in range(2)]
    single = act_estimates(ActivationHessian(tiny_gpt("simplegpt"), token_batches(ACT_SIZES), ACT_SITE))
    n = len(single["hv"])
    assert [list(r["mine"]) for r in ranks] == [[0, 2, 4], [1, 3]]
    assert [int(r["local_n"]) for r in ranks] == [7 * 96, 2 * 96] and all(int(r["n"]) == n == 9 * 96 for r in ranks)
    for key in ("hv", "hV"):
        np.testing.assert_allclose(whole(ranks, key), single[key].numpy(), rtol=1e-12, atol=1e-14)
    for key in ("eigs", "interval", "norm", "norm_interval", "power", "power_interval", "hutchinson", "hutchpp",
                "xtrace", "slq_moments", "alpha", "beta", "warm", "stored32"):
        for r in ranks:
            np.testing.assert_allclose(r[key], single[key], rtol=1e-8, atol=1e-12, err_msg=key)
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)  # one iteration on both ranks
    np.testing.assert_allclose(ranks[0]["slq_density"], single["slq_density"], rtol=1e-8, atol=1e-10)
    assert int(ranks[0]["steps"]) == single["steps"]
    # Ritz and power vectors come back as each rank's rows of the single-process vector.
    for key in ("ritz", "power_vector"):
        want = single[key].numpy()
        np.testing.assert_allclose(same_up_to_sign(whole(ranks, key), want), want, atol=1e-8, err_msg=key)
    # A warm start given as each rank's shard is the warm start given whole; a basis budget is per rank, sized
    # by the largest rank's rows (11 vectors: 10 steps on every rank).
    for r in ranks:
        np.testing.assert_array_equal(r["warm_shard"], r["warm"])
        assert int(r["budget_steps"]) == 10
    # Each rank stores only its local_n rows of every Krylov vector, and no collective moves a vector: products
    # communicate nothing, the estimators only scalars and coefficient vectors (at most one per basis vector).
    for r in ranks:
        assert [tuple(s) for s in r["basis_shapes"]] == [(16, int(r["local_n"])), (BASIS_STEPS + 1 - 16, int(r["local_n"]))]
        assert int(r["product_collectives"]) == 0
        # the largest: Gram-Schmidt coefficients (one per basis vector) and Hutch++'s 10 x 10 R factor (TSQR)
        assert 0 < r["estimator_sizes"].max() <= max(int(r["steps"]), 10 * 10) < int(ranks[1]["local_n"])
