"""Independent float64 references for the operator tests: dense Hessians by jacfwd(grad(f)) (chunked), confirmed
by central differences of first-order gradients; never torch.func.hessian / jacrev."""

import torch
import torch.nn.functional as F

from models import GPTConfig, build_model, math_attention, next_token_loss

ARCHS = ("llama2", "llama2_qknorm", "simplegpt", "gpt2", "simplegpt_gpt2")


def tiny_gpt(arch: str, seed: int = 0, n_layers: int = 1, dropout: float = 0.0):
    """dim 16, 2 heads, vocab 11, seq 6, FFN width 16, float64, eval mode."""
    torch.manual_seed(seed)
    cfg = GPTConfig(arch=arch, vocab_size=11, dim=16, n_layers=n_layers, n_heads=2, seq_len=6, ffn_hidden=16,
                    dropout=dropout, norm_backend="torch")
    return build_model(cfg).double().eval()


def token_batches(sizes=(2,), seq=6, vocab=11, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (b, seq), generator=gen), torch.randint(0, vocab, (b, seq), generator=gen))
            for b in sizes]


def flat_param_loss(model, batches, names, weights=None):
    """theta (flat, the named parameters in order) -> sum_b w_b mean CE of batch b; w_b by target count."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    counts = [b[-1].numel() for b in batches]
    weights = weights or [c / sum(counts) for c in counts]

    def f(theta):
        parts = theta.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        total = 0.0
        with math_attention():
            for w, (idx, tgt) in zip(weights, batches):
                logits = torch.func.functional_call(model, params, (idx,))
                total = total + w * F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        return total

    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    return f, theta


def dense_hessian(f, x, chunk=512):
    """Columns H e_i = jvp of grad(f) at x along e_i, vmapped in chunks (= jacfwd(grad(f)))."""
    grad = torch.func.grad(f)
    column = lambda t: torch.func.jvp(grad, (x,), (t,))[1]  # noqa: E731
    eye = torch.eye(x.numel(), dtype=x.dtype)
    H = torch.cat([torch.func.vmap(column)(eye[i : i + chunk]) for i in range(0, x.numel(), chunk)]).T.detach()
    return (H + H.T) / 2, H


def differences(f, x, v, step=1e-5):
    """Central difference of the gradient along v (float64, first-order autograd only)."""
    grad = torch.func.grad(f)
    return (grad(x + step * v) - grad(x - step * v)) / (2 * step)


def confirmed_dense_hessian(f, x, n_dirs=2, seed=0):
    """Dense Hessian, checked to be symmetric and to match central differences along random directions."""
    H_sym, H = dense_hessian(f, x)
    assert torch.allclose(H, H.T, rtol=0, atol=1e-10 * float(H.abs().max())), "reference not symmetric"
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_dirs):
        v = torch.randn(x.numel(), generator=gen, dtype=x.dtype)
        v /= v.norm()
        fd = differences(f, x, v)
        assert (H_sym @ v - fd).norm() <= 1e-6 * fd.norm(), "reference disagrees with differences"
    return H_sym


def reference_products(f, x, V):
    """H V column by column as jvp of grad(f) (one column of jacfwd(grad(f)) per direction), each confirmed
    by central differences of the gradient."""
    grad = torch.func.grad(f)
    cols = []
    for v in V.T:
        hv = torch.func.jvp(grad, (x,), (v,))[1]
        fd = differences(f, x, v / v.norm()) * v.norm()
        assert (hv - fd).norm() <= 1e-6 * fd.norm(), "reference disagrees with differences"
        cols.append(hv)
    return torch.stack(cols, 1)


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


class LayerNormMLP(torch.nn.Module):
    """4 -> 6 -> LayerNorm -> tanh -> 3 classes; 63 parameters."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.ln = torch.nn.LayerNorm(6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def layernorm_mlp(seed: int = 0):
    """The MLP in float64 with non-trivial LayerNorm weights, and one batch of 8 examples."""
    torch.manual_seed(seed)
    model = LayerNormMLP().double()
    with torch.no_grad():
        model.ln.weight.add_(0.3 * torch.randn(6, dtype=torch.float64))
        model.ln.bias.add_(0.3 * torch.randn(6, dtype=torch.float64))
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    return model, batch


def flat_mlp_loss(model, batch):
    """theta (all parameters, flat) -> mean CE of the MLP on the batch."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def f(theta):
        parts = theta.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    return f, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def site_loss(model, batch, site, weight=1.0):
    """a (flat) -> weight * loss with the activation at `site` replaced by activation + a, and the activation."""
    name, end = site.rsplit(":", 1)
    module = model.get_submodule(name)
    seen = {}

    def record(x):
        seen.setdefault("x", x.detach())
        return x + seen["delta"].view(x.shape) if "delta" in seen else x

    if end == "out":
        handle = module.register_forward_hook(lambda m, args, out: record(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: (record(args[0]),) + tuple(args[1:]))
    with torch.no_grad():
        next_token_loss(model, batch)

    def f(a):
        seen["delta"] = a
        try:
            with math_attention():
                return weight * next_token_loss(model, batch)
        finally:
            del seen["delta"]

    return f, torch.zeros(seen["x"].numel(), dtype=torch.float64), handle
