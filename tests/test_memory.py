"""Memory: the meter against known allocations and against PyTorch's own allocation events; the memory budget
(kept graphs, fresh graphs, micro-batches) gives the same products as no budget and stays within it."""

import json

import pytest
import torch
from operator_refs import rel, tiny_gpt, token_batches
from test_cli_measure import DATA, EXACT, PARAMS, ckpt_dir  # noqa: F401  (the checkpoint fixture)

from hessian_tools.cli import main
from hessian_tools.errors import UserError
from hessian_tools.operators import ActivationHessian, GaussNewton, ParamHessian
from hessian_tools.operators.memory import MemoryMeter

AGREE = 1e-10  # float64 products of one function summed over different micro-batches differ by rounding only


def test_meter_counts_new_storages_not_views_or_in_place_results():
    x = torch.randn(100, 1000)  # 400,000 bytes, allocated before: not counted
    with MemoryMeter("cpu") as meter:
        a = x * 2  # 400,000
        b = a * 3  # 800,000 alive
        a.view(-1).add_(1)  # a view and an in-place result: no new memory
        del a  # 400,000 alive
        c = x[:50] + 1  # 200,000: 600,000 alive
    assert meter.peak == 800_000 and meter.live == 600_000
    del b, c


def test_meter_agrees_with_the_allocators_own_events_on_a_double_backward():
    """The profiler's allocation events (c10's memory reporter) are an independent count of the same bytes."""
    from torch.profiler import ProfilerActivity, profile

    model, batches = tiny_gpt("llama2_qknorm"), token_batches((3,))
    ours = ParamHessian(model, batches, mode="double-backward")
    theirs = ParamHessian(model, batches, mode="double-backward")
    v = torch.randn(ours.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours.matvec(v)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        theirs._matvec(v)
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
    running, peak = 0, 0
    for _, size in sorted(sizes):
        running += size
        peak = max(peak, running)
    memory = ours.memory()
    assert memory["measured_peak_bytes"] == peak
    assert memory["kept_graphs_bytes"] == running  # what stays alive (the product itself was discarded)


def test_fresh_products_keep_no_graph_and_peak_below_kept_ones():
    model, batches = tiny_gpt("simplegpt"), token_batches((2, 2))
    kept = ParamHessian(model, batches, mode="double-backward")
    fresh = ParamHessian(model, batches, mode="double-backward", keep_graph=False)
    v = torch.ones(kept.shape[0], dtype=torch.float64)
    kept.matvec(v), fresh.matvec(v)
    k, f = kept.memory(), fresh.memory()
    assert k["kept_graphs_bytes"] > 0 and f["kept_graphs_bytes"] == 0 and k["terms"] == f["terms"] == 2
    # kept: the second batch's peak comes on top of the first batch's graph
    assert f["measured_peak_bytes"] < k["measured_peak_bytes"]
    assert k["measured_peak_bytes"] > k["kept_graphs_bytes"] / 2


def budget_cases():
    """(name, make(budget)) for the three operator kinds, at 2 batches of 4 and 3 rows."""
    model, batches = tiny_gpt("gpt2"), token_batches((4, 3))
    site = "transformer.h.0.mlp.c_fc:in"
    return {
        "params": lambda **kw: ParamHessian(model, batches, mode="double-backward", **kw),
        "activation": lambda **kw: ActivationHessian(model, batches, site, mode="double-backward", **kw),
        "gauss-newton": lambda **kw: GaussNewton(model, batches, params=r"c_fc", **kw),
    }


@pytest.mark.parametrize("kind", ["params", "activation", "gauss-newton"])
def test_memory_budget_plans_give_the_same_products_within_the_budget(kind):
    make = budget_cases()[kind]
    free = make()
    V = torch.randn(free.shape[0], 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = free.matmat(V)
    roomy = make(memory_budget=10 * free.memory()["measured_peak_bytes"])
    probe = roomy.memory()["probe"]  # None until the first product
    assert probe is None
    plans = {}
    for name in ("roomy", "fresh", "micro"):
        if name == "roomy":
            op = roomy
        else:
            fixed, per_row = probe["fixed_peak_bytes"], probe["per_row_peak_bytes"]
            rows = 4 if name == "fresh" else 2  # the largest batch has 4 rows
            op = make(memory_budget=int(fixed + per_row * (rows + 0.5)))
        got = op.matmat(V)
        memory = op.memory()
        probe = memory["probe"]
        plans[name] = memory["plan"]
        assert rel(got, ref) < AGREE, memory["plan"]
        assert probe["products"] == 2 and op.hvp_count == 2 + 2  # the probes are counted
        assert memory["predicted_peak_bytes"] <= memory["budget_bytes"]
        assert memory["measured_peak_bytes"] <= memory["budget_bytes"], memory
    assert plans == {"roomy": "kept graphs", "fresh": "a fresh graph per product",
                     "micro": "a fresh graph per product, micro-batches of 2 rows"}


def test_a_budget_below_one_row_is_a_one_line_error():
    make = budget_cases()["params"]
    with pytest.raises(UserError, match="below one row's product"):
        make(memory_budget=1000).matvec(torch.ones(make().shape[0], dtype=torch.float64))
    with pytest.raises(UserError, match="positive number of bytes"):
        make(memory_budget=-5)


def test_micro_batches_split_rows_with_their_weights():
    """Micro-batches of 2 rows of a 3-row batch weight their rows by target count (2/3 and 1/3 of the batch)."""
    model, batches = tiny_gpt("llama2"), token_batches((3,))
    op = ParamHessian(model, batches, mode="double-backward")
    terms = op.terms_of(0, 2)
    assert [t.rows for t in terms] == [(0, 2), (2, 3)]
    assert [t.weight for t in terms] == pytest.approx([2 / 3, 1 / 3])
    act = ActivationHessian(model, batches, "layers.0.attention.wq:in", mode="double-backward")
    sub = act.terms_of(0, 2)
    assert [(t.offset, t.size) for t in sub] == [(0, 2 * 6 * 16), (2 * 6 * 16, 6 * 16)]


def test_cli_memory_budget_micro_batches_and_records_the_plan(ckpt_dir, capsys):
    argv = ["spectrum", str(ckpt_dir), "--params", PARAMS, "--tol", "1e-8", "--json", *DATA, *EXACT]
    assert main(argv) == 0
    free = json.loads(capsys.readouterr().out)
    peak = free["settings"]["operator"]["memory"]["measured_peak_bytes"]
    assert main(argv + ["--memory-budget", str(peak // 2)]) == 0
    tight = json.loads(capsys.readouterr().out)
    memory = tight["settings"]["operator"]["memory"]
    assert memory["budget_bytes"] == peak // 2 and memory["measured_peak_bytes"] <= peak // 2
    assert memory["plan"] != free["settings"]["operator"]["memory"]["plan"]
    assert tight["value"] == pytest.approx(free["value"], rel=1e-7)
    assert main(argv + ["--memory-budget", "0"]) == 2
    assert "--memory-budget must be a positive integer" in capsys.readouterr().err
