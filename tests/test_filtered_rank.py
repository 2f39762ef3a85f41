"""Op family C, the evaluation side: filtered_rank (and its counts), rank_metrics, build_filter.

Oracles: PyKEEN's Ranks.from_scores on filtered score matrices (optimistic, pessimistic,
realistic), PyKEEN's RankBasedEvaluator on a real KG it ships (UMLS) with a TransE model, python
sets for the filter, metrics worked out by hand. Scores are exact in the counting tests (entries
are small integers, so every score is an exactly representable integer): the ranks must then be
equal, not close, whatever order a kernel sums in.
"""
import importlib

import pytest
import torch

import mmcl_fast
from mmcl_fast.backend import triton_interpreting
from mmcl_fast.ops import build_filter, filtered_rank, filtered_rank_counts, rank_metrics

from conftest import cpu_backends, gpu_backends, skip_unless

fr = importlib.import_module("mmcl_fast.ops.filtered_rank")
INTERP = triton_interpreting()
SCORES = fr.SCORES


def make_problem(B, N, D, *, dtype=torch.float32, device="cpu", seed=0, C=None, ties=True):
    """Integer-valued queries and entities (exact scores), duplicated entity rows (exact ties,
    the target's twin included), and a filter with duplicates, the target itself and ids >= C."""
    g = torch.Generator().manual_seed(seed)
    C = C or N
    q = torch.randint(-3, 4, (B, D), generator=g).to(dtype)
    e = torch.randint(-3, 4, (N, D), generator=g).to(dtype)
    if D % 2 == 0:  # per complex coordinate, the real or the imaginary part is 0: rotate's moduli are integers
        h = D // 2
        zero = torch.arange(D) % h % 2 == torch.arange(D) // h
        q[:, zero], e[:, zero] = 0, 0
    target = torch.randint(0, C, (B,), generator=g)
    if ties and N > 3:
        twins = torch.randint(0, N, (max(1, N // 4),), generator=g)
        e[torch.randint(0, N, twins.shape, generator=g)] = e[twins]
        e[(target[: B // 2] + 1) % N] = e[target[: B // 2]]  # a tie with the target itself
    rows, indptr = [], [0]
    for b in range(B):
        k = int(torch.randint(0, 6, (), generator=g))
        r = torch.randint(0, N, (k,), generator=g).tolist()
        if k and b % 3 == 0:
            r += [r[0], int(target[b])]   # a duplicate and the target
        rows += sorted(r) if b % 2 else r  # some rows unsorted: the op sorts them
        indptr.append(len(rows))
    dev = torch.device(device)
    return (q.to(dev), e.to(dev), target.to(dev), torch.tensor(indptr, device=dev),
            torch.tensor(rows, dtype=torch.int64, device=dev))


def pykeen_ranks(q, e, target, indptr, indices, score, C):
    """PyKEEN's ranks on our score matrix: the filtered entries set to NaN (as its evaluator's
    filter_scores_ does), the true score kept."""
    ranks_mod = pytest.importorskip("pykeen.evaluation.ranks")
    s = fr.reference_scores(q.double(), e.double(), score, C)
    B = s.shape[0]
    true = s.gather(1, target[:, None]).clone()
    rows = torch.repeat_interleave(torch.arange(B), indptr.diff())
    keep = indices < C
    s[rows[keep], indices[keep]] = float("nan")
    s[torch.arange(B), target] = true[:, 0]
    return ranks_mod.Ranks.from_scores(true, s)


@pytest.mark.parametrize("score", SCORES)
def test_reference_ranks_equal_pykeen(score):
    q, e, t, ip, ix = make_problem(40, 57, 12, dtype=torch.float64, C=50)
    t = t % 50
    want = pykeen_ranks(q, e, t, ip, ix, score, 50)
    with mmcl_fast.use_backend("reference"):
        for ties in ("optimistic", "pessimistic", "realistic"):
            got = filtered_rank(q, e, t, ip, ix, score, num_candidates=50, ties=ties)
            assert torch.equal(got, getattr(want, ties).double()), ties


# (B, N, D): odd shapes; the interpreter runs the first two
RANK_CASES = [(1, 1, 8), (7, 13, 6), (33, 129, 200), (1000, 15000, 200), (7, 300, 256)]


def exact_scores(q, e, score):
    """The scores of make_problem's data by matrix products (exact in float64 for small integers;
    rotate's moduli are integers there, so rotate is the L1 score): an oracle independent of the
    library's reference."""
    q, e = q.double().cpu(), e.double().cpu()
    if score in ("transe_l1", "rotate"):
        return -torch.cdist(q, e, p=1)
    if score == "transe_l2":
        return -((q * q).sum(1)[:, None] + (e * e).sum(1)[None, :] - 2 * q @ e.T)
    return q @ e.T


def expected_counts(q, e, target, indptr, indices, score, C=None):
    s = exact_scores(q, e[:C], score)
    B = s.shape[0]
    t = target.cpu()
    st = s.gather(1, t[:, None])
    out = torch.zeros(B, C or e.shape[0], dtype=torch.bool)
    out[torch.arange(B), t] = True
    rows = torch.repeat_interleave(torch.arange(B), indptr.cpu().diff())
    keep = indices.cpu() < out.shape[1]
    out[rows[keep], indices.cpu()[keep]] = True
    return ((s > st) & ~out).sum(1), ((s == st) & ~out).sum(1)


def _compare_counts(backend, case, score, *, dtype=torch.float32, device="cpu", C=None):
    B, N, D = case
    q, e, t, ip, ix = make_problem(B, N, D, dtype=dtype, device=device, C=C)
    with mmcl_fast.use_backend(backend):
        g, eq = filtered_rank_counts(q, e, t, ip, ix, score, C)
    assert g.dtype == torch.int64 and g.shape == (B,)
    want_g, want_eq = expected_counts(q, e, t, ip, ix, score, C)
    assert torch.equal(g.cpu(), want_g), "greater"
    assert torch.equal(eq.cpu(), want_eq), "equal"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ci", range(len(RANK_CASES)))
@pytest.mark.parametrize("score", SCORES)
def test_counts_match_reference(backend, ci, score):
    skip_unless(backend)
    if backend == "triton" and ci > 1:
        pytest.skip("the Triton interpreter runs the small cases")
    if ci == 3 and (backend == "reference" or score not in ("transe_l1", "dot")):
        pytest.skip("the large case runs the kernels on two scores (time)")
    _compare_counts(backend, RANK_CASES[ci], score)


@pytest.mark.parametrize("backend", cpu_backends())
def test_num_candidates_restricts_the_candidates(backend):
    skip_unless(backend)
    _compare_counts(backend, (9, 40, 8), "transe_l1", C=25)


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_tie_counts_and_the_filter_removes_exactly_its_entries(backend):
    """All candidates share the target's score: pessimistic rank = 1 + (C - 1 - #filtered distinct
    others), optimistic 1."""
    skip_unless(backend)
    q = torch.ones(3, 4)
    e = torch.ones(10, 4)
    t = torch.tensor([0, 5, 9])
    ip = torch.tensor([0, 4, 4, 7])
    ix = torch.tensor([3, 1, 3, 0, 9, 2, 9])  # row 0: {0 (target), 1, 3, 3}; row 2: {2, 9 (target), 9}
    with mmcl_fast.use_backend(backend):
        opt = filtered_rank(q, e, t, ip, ix, "dot", ties="optimistic")
        pes = filtered_rank(q, e, t, ip, ix, "dot", ties="pessimistic")
        real = filtered_rank(q, e, t, ip, ix, "dot")
    assert opt.tolist() == [1, 1, 1]
    assert pes.tolist() == [1 + 9 - 2, 1 + 9, 1 + 9 - 1]
    assert real.tolist() == [(1 + 8) / 2, (1 + 10) / 2, (1 + 9) / 2]


def test_pykeen_evaluator_on_umls_equals_our_metrics():
    """A TransE model on UMLS (a real KG shipped in PyKEEN), random weights: PyKEEN's filtered
    RankBasedEvaluator and ours (build_filter + filtered_rank, head and tail) give the same MRR and
    Hits@k, realistic and optimistic."""
    pytest.importorskip("pykeen")
    from pykeen.datasets import UMLS
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import TransE

    ds = UMLS()
    torch.manual_seed(0)
    model = TransE(triples_factory=ds.training, embedding_dim=16, scoring_fct_norm=1, random_seed=0)
    test = ds.testing.mapped_triples
    known = torch.cat([ds.training.mapped_triples, ds.validation.mapped_triples, test])
    res = RankBasedEvaluator(filtered=True).evaluate(
        model, test, additional_filter_triples=[ds.training.mapped_triples, ds.validation.mapped_triples],
        batch_size=256, use_tqdm=False)
    with torch.no_grad():
        E = model.entity_representations[0]().detach()
        R = model.relation_representations[0]().detach()
    h, r, t = test[:, 0], test[:, 1], test[:, 2]
    ranks = {}
    for ties in ("realistic", "optimistic"):
        tails = filtered_rank(E[h] + R[r], E, t, *build_filter(known, test, "tail"), "transe_l1", ties=ties)
        heads = filtered_rank(E[t] - R[r], E, h, *build_filter(known, test, "head"), "transe_l1", ties=ties)
        ranks[ties] = torch.cat([heads, tails])
    for ties in ("realistic", "optimistic"):
        ours = rank_metrics(ranks[ties], ks=(1, 3, 10))
        theirs = {"mrr": res.get_metric(f"both.{ties}.inverse_harmonic_mean_rank"),
                  **{f"hits@{k}": res.get_metric(f"both.{ties}.hits_at_{k}") for k in (1, 3, 10)}}
        for key, val in theirs.items():
            assert abs(ours[key] - val) < 1e-6, f"{ties} {key}: ours {ours[key]} pykeen {val}"


def test_rank_metrics_by_hand():
    m = rank_metrics(torch.tensor([1.0, 2.0, 4.0, 10.5]), ks=(1, 3, 10))
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 10.5) / 4)
    assert m["mr"] == pytest.approx(17.5 / 4)
    assert (m["hits@1"], m["hits@3"], m["hits@10"]) == (0.25, 0.5, 0.75)


def test_build_filter_equals_python_sets():
    g = torch.Generator().manual_seed(0)
    known = torch.stack([torch.randint(0, 12, (300,), generator=g), torch.randint(0, 3, (300,), generator=g),
                         torch.randint(0, 12, (300,), generator=g)], 1)
    queries = torch.cat([known[:40], torch.tensor([[11, 2, 11], [0, 0, 0]])])
    for side, (a, b, ans) in (("tail", (0, 1, 2)), ("head", (2, 1, 0))):
        indptr, indices = build_filter(known, queries, side)
        for i, row in enumerate(queries.tolist()):
            want = sorted({k[ans] for k in known.tolist() if k[a] == row[a] and k[b] == row[b]})
            assert indices[indptr[i]:indptr[i + 1]].tolist() == want, (side, i)


# -- bad input ------------------------------------------------------------------------------------
def _bad(change):
    q, e, t, ip, ix = make_problem(4, 10, 6)
    kw = dict(queries=q, entities=e, target=t, filter_indptr=ip, filter_indices=ix, score="transe_l1")
    change(kw)
    return kw


@pytest.mark.parametrize("change,exc,match", [
    (lambda kw: kw.update(score="transh"), ValueError, "score must be one of"),
    (lambda kw: kw.update(num_candidates=11), ValueError, "num_candidates must be an int in"),
    (lambda kw: kw.update(num_candidates=0), ValueError, "num_candidates must be an int in"),
    (lambda kw: kw.update(filter_indptr=torch.tensor([0, 3, 2, 5, len(kw["filter_indices"])])), ValueError,
     "non-decreasing"),
    (lambda kw: kw.update(filter_indptr=torch.tensor([1, 1, 1, 1, 1])), ValueError, "must start at 0"),
    (lambda kw: kw.update(filter_indices=torch.full_like(kw["filter_indices"], 10)), ValueError,
     "filter_indices holds id 10"),
    (lambda kw: kw.update(filter_indices=torch.full_like(kw["filter_indices"], -2)), ValueError,
     "filter_indices holds id -2"),
    (lambda kw: kw.update(target=torch.tensor([0, 1, 2, 10])), ValueError, "target holds id 10"),
    (lambda kw: kw.update(entities=torch.zeros(10, 5)), ValueError, "entities must be"),
    (lambda kw: kw.update(entities=torch.zeros(10, 6, dtype=torch.float64)), TypeError, "entities must have"),
    (lambda kw: kw.update(queries=torch.zeros(4, 5), entities=torch.zeros(10, 5), score="rotate"), ValueError,
     "even width"),
    (lambda kw: kw.update(target=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "target must be int64"),
])
def test_bad_input_is_named(change, exc, match):
    kw = _bad(change)
    for backend in ("reference", "cpu"):
        if mmcl_fast.backend.why_not(backend, torch.device("cpu"), torch.float32):
            continue
        with mmcl_fast.use_backend(backend), pytest.raises(exc, match=match):
            filtered_rank(**kw)
    with pytest.raises(ValueError, match="ties must be one of"):
        filtered_rank(**_bad(lambda kw: None), ties="average")


def test_build_filter_bad_input():
    with pytest.raises(ValueError, match="side must be"):
        build_filter(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64), "both")
    with pytest.raises(ValueError, match="known_triples must be"):
        build_filter(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="triples holds a negative id"):
        build_filter(torch.zeros(2, 3, dtype=torch.int64), -torch.ones(1, 3, dtype=torch.int64))


# -- torch.library ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    skip_unless(backend)
    if backend == "triton":
        from mmcl_fast.kernels import filtered_rank as _tk  # noqa: F401
        op = torch.ops.mmcl_fast.filtered_rank_counts_triton.default
    else:
        op = torch.ops.mmcl_fast.filtered_rank_counts.default
    q, e, t, ip, ix = make_problem(5, 11, 6)
    ix = fr._sorted_rows(ip, ix, 11)
    for score in range(len(SCORES)):
        torch.library.opcheck(op, (q, e, t, ip, ix, score, 11))


def test_torch_compile_fullgraph():
    skip_unless("cpu")
    q, e, t, ip, ix = make_problem(6, 20, 8)

    def f(q, e, t, ip, ix):
        return filtered_rank(q, e, t, ip, ix, "transe_l1")

    with mmcl_fast.use_backend("cpu"):
        eager = f(q, e, t, ip, ix)
        comp = torch.compile(f, fullgraph=True, backend="aot_eager")(q, e, t, ip, ix)
    assert torch.equal(eager, comp)


# -- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ci", range(len(RANK_CASES)))
@pytest.mark.parametrize("score", SCORES)
def test_gpu_counts_match_reference(backend, dtype, ci, score):
    skip_unless(backend, "cuda", dtype)  # small integers are exact in every dtype; scores accumulate in float32
    _compare_counts(backend, RANK_CASES[ci], score, dtype=dtype, device="cuda")
