"""Op family A benchmarks: the fused per-modality gradient-modulated optimizer step.

Groups (DESIGN.md section 11):
  A-noise   GE noise on, ~400 tensors / ~20M parameters of two BERT/ViT-like streams (hidden 256,
            12 layers each): the seed-style loop (per-tensor .std().item(), normal_, scale, then
            torch AdamW foreach), torch.compile of that loop, and ModalityAdamW on each backend.
  A-plain-k noise off, k != 1: torch._foreach_mul_ + torch.optim.AdamW(fused=True) vs ours.
  A-copy    a plain copy of the same bytes, for the bandwidth column.
  A-rows    a KGE step's optimizer work: an entity table 15,000 x 200 and a relation table 237 x 200,
            of which one batch (1024 positives x (2 + 16 negatives) random entity ids, 1024
            relation ids) touches the rows (~70% of the entities distinct). Timed: the step from
            the backward's output (p.grad) to the updated tables, including what turns that output
            into the step (SparseAdam's and our coalescing of the uncoalesced embedding gradient):
            torch.optim.Adam on the dense gradient (first: the baseline; what PyKEEN and a plain
            loop do), torch.optim.SparseAdam on the sparse gradient, our fused dense ModalityAdamW
            on the dense gradient, and ModalityAdamW on the sparse gradient (the row-sparse lazy
            step) on each of our backends present. Bytes: the tables' bytes each must move
            (dense: p, g, m, v read and p, m, v written; sparse: the same for the touched rows).
Each benchmark records `bytes` in extra_info (the bytes that must move); benchmarks/report.py turns
pytest-benchmark's JSON into a table of medians, ratios and GB/s.

    pytest benchmarks/bench_modality_step.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import pytest
import torch
from torch import nn

import mmcl_fast
from mmcl_fast.optim import ModalityAdamW, param_groups_by_modality

from conftest import present_backends, run_bench, small

K = {"vision": 0.6, "text": 1.0}


def _stream(hidden, layers, ffn):
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(hidden, hidden) for _ in range(4)]  # q, k, v, out
        mods += [nn.Linear(hidden, ffn), nn.Linear(ffn, hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)]
    return nn.Sequential(*mods)


class TwoStreams(nn.Module):
    """Layer shapes of BERT-base / ViT-B/32 scaled down to ~20M parameters in ~400 tensors."""

    def __init__(self, hidden, layers, vocab, patches):
        super().__init__()
        self.text = nn.ModuleDict({"embed": nn.Embedding(vocab, hidden), "layers": _stream(hidden, layers, 4 * hidden)})
        self.vision = nn.ModuleDict({"patch": nn.Linear(3 * 32 * 32, hidden), "pos": nn.Embedding(patches, hidden),
                                     "layers": _stream(hidden, layers, 4 * hidden)})
        self.head = nn.Linear(2 * hidden, 23)


def _model(device):
    torch.manual_seed(0)
    m = TwoStreams(32, 2, 100, 50) if small() else TwoStreams(256, 12, 2048, 50)
    m = m.to(device)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return m


def _groups(model):
    return param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"})


def _nbytes(model, passes):
    return sum(p.numel() * p.element_size() for p in model.parameters()) * passes


def _saved_grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _restore(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad.copy_(g)


def _bench(benchmark, device, fn, setup, nbytes, rounds):
    run_bench(benchmark, device, fn, setup, rounds, bytes=nbytes)


ROUNDS = 3 if small() else 15


def _seed_style_modulation(model, groups):
    """What OGM-GE / MSPT do after backward(): one host sync and one noise tensor per parameter."""
    for g in groups:
        k = K.get(g.get("modality"))
        if k is None:
            continue
        for p in g["params"]:
            std = p.grad.std().item()
            noise = torch.zeros_like(p.grad).normal_(0, std + 1e-8)
            p.grad.mul_(k).add_(noise)


# ---- A-noise ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group="A-noise")
def test_noise_seed_style_loop(benchmark, device):
    model = _model(device)
    groups = _groups(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    grads = _saved_grads(model)

    def step():
        _seed_style_modulation(model, groups)
        opt.step()

    _bench(benchmark, device, step, lambda: _restore(model, grads), _nbytes(model, 8), ROUNDS)


@pytest.mark.benchmark(group="A-noise")
def test_noise_seed_style_loop_compiled(benchmark, device):
    model = _model(device)
    groups = _groups(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    grads = _saved_grads(model)
    mod_params = [(p, K[g["modality"]]) for g in groups if g.get("modality") in K for p in g["params"]]

    @torch.compile
    def modulate():
        # the seed loop, written so that the compiler can trace it (std stays a tensor)
        for p, k in mod_params:
            p.grad.mul_(k).add_(torch.randn_like(p.grad) * (p.grad.std() + 1e-8))

    compiled_step = torch.compile(opt.step)

    def step():
        modulate()
        compiled_step()

    _bench(benchmark, device, step, lambda: _restore(model, grads), _nbytes(model, 8), ROUNDS)


BACKENDS = present_backends(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _bench_ours(benchmark, device, backend, noise):
    model = _model(device)
    opt = ModalityAdamW(_groups(model), lr=1e-4, noise=noise)
    k = torch.tensor([K[m] for m in opt.modalities], device=device)

    def step():
        with mmcl_fast.use_backend(backend):
            opt.step(coefficients=k)

    _bench(benchmark, device, step, None, _nbytes(model, 8 if noise else 7), ROUNDS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.benchmark(group="A-noise")
def test_noise_ours(benchmark, device, backend):
    _bench_ours(benchmark, device, backend, noise=True)


# ---- A-plain-k -------------------------------------------------------------------------------


@pytest.mark.benchmark(group="A-plain-k")
def test_plain_k_foreach_mul_fused_adamw(benchmark, device):
    model = _model(device)
    groups = _groups(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    per_k = [([p.grad for p in g["params"]], K[g["modality"]]) for g in groups if g.get("modality") in K]

    def step():
        for grads, k in per_k:
            torch._foreach_mul_(grads, k)
        opt.step()

    _bench(benchmark, device, step, None, _nbytes(model, 7), ROUNDS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.benchmark(group="A-plain-k")
def test_plain_k_ours(benchmark, device, backend):
    _bench_ours(benchmark, device, backend, noise=False)


# ---- copy bandwidth --------------------------------------------------------------------------


@pytest.mark.benchmark(group="A-copy")
def test_copy_bandwidth(benchmark, device):
    n = sum(p.numel() for p in _model(device).parameters())
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    _bench(benchmark, device, lambda: dst.copy_(src), None, 2 * src.numel() * src.element_size(), ROUNDS)


# ---- A-rows ----------------------------------------------------------------------------------

N_ENT, N_REL, DIM = (300, 11, 16) if small() else (15_000, 237, 200)
POS, SLOTS = (32, 2 + 16) if small() else (1024, 2 + 16)  # per positive: head, tail, 16 negatives


def _kge_tables(device, sparse):
    """The entity and relation tables with the gradient of one KGE batch, as backward leaves it
    (sparse: nn.Embedding(sparse=True)'s uncoalesced COO gradient; dense: a dense table)."""
    torch.manual_seed(0)
    tables = [nn.Embedding(n, DIM, sparse=sparse).to(device) for n in (N_ENT, N_REL)]
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, N_ENT, (POS * SLOTS,), generator=g), torch.randint(0, N_REL, (POS,), generator=g)]
    for emb, i in zip(tables, ids):
        out = emb(i.to(device))
        (out * torch.randn(out.shape, generator=g).to(device)).sum().backward()
    touched = sum(int(i.unique().numel()) for i in ids)
    return [t.weight for t in tables], touched


def _rows_bytes(params, touched, sparse):
    elem = params[0].element_size()
    if sparse:
        return 7 * touched * DIM * elem
    return 7 * sum(p.numel() for p in params) * elem


def _bench_rows(benchmark, device, opt, params, touched, sparse, backend=None):
    def step():
        with mmcl_fast.use_backend(backend):
            opt.step()

    run_bench(benchmark, device, step, None, ROUNDS, bytes=_rows_bytes(params, touched, sparse),
              touched_rows=touched)


@pytest.mark.benchmark(group="A-rows")
def test_rows_torch_adam_dense_grad(benchmark, device):
    params, touched = _kge_tables(device, sparse=False)
    _bench_rows(benchmark, device, torch.optim.Adam(params, lr=1e-3), params, touched, False)


@pytest.mark.benchmark(group="A-rows")
def test_rows_torch_sparse_adam(benchmark, device):
    params, touched = _kge_tables(device, sparse=True)
    _bench_rows(benchmark, device, torch.optim.SparseAdam(params, lr=1e-3), params, touched, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", ["dense_grad", "sparse_grad", "sorted_rows_grad"])
@pytest.mark.benchmark(group="A-rows")
def test_rows_ours(benchmark, device, grad, backend):
    """sorted_rows_grad: the sparse gradient as mmcl_fast.nn.MultimodalKGE makes it (its rows
    sorted and distinct, so that no coalescing is needed; autograd leaves it flagged uncoalesced)."""
    sparse = grad != "dense_grad"
    params, touched = _kge_tables(device, sparse=sparse)
    if grad == "sorted_rows_grad":
        for p in params:
            c = p.grad.coalesce()
            p.grad = torch.sparse_coo_tensor(c.indices(), c.values(), c.shape)
    opt = ModalityAdamW(params, lr=1e-3, weight_decay=0.0)
    _bench_rows(benchmark, device, opt, params, touched, sparse, backend)
