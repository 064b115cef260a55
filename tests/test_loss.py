"""SigLIP / CLIP losses: the chunked ring loss against the dense oracle and open_clip, on real gloo ranks.

Gradients are checked the way the training engine uses them: a tiny tower (one shared linear layer
plus L2 normalisation, the same weights on every rank) embeds each rank's slice of a global batch;
each rank backprops its own loss; parameter gradients are averaged over ranks as DDP/FSDP do; the
result must equal the gradient of the dense loss over the whole global batch through the same tower.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_helpers import run_distributed
from sigscale.pretrain.loss import chunked_sigmoid_loss, default_chunk_size, sigmoid_loss, softmax_loss

RAW, DIM = 6, 8  # raw feature and embedding sizes of the toy tower
F64, F32 = torch.float64, torch.float32
PARAMS = ("w_img", "w_txt", "logit_scale", "logit_bias")

# b = local batch; odd b gives unequal ring halves; chunk sizes that do not divide b or b/2 included.
CASES = [
    dict(b=5, chunk=None, dtype=F64, log_t=math.log(10), bias=-10.0, shape=(1,), seed=1),
    dict(b=5, chunk=2, dtype=F64, log_t=math.log(2), bias=0.5, shape=(), seed=2),
    dict(b=8, chunk=3, dtype=F64, log_t=math.log(4), bias=-1.0, shape=(1,), seed=3),
    dict(b=1, chunk=None, dtype=F64, log_t=math.log(3), bias=-2.0, shape=(1,), seed=4),
    dict(b=7, chunk=1, dtype=F64, log_t=math.log(5), bias=-3.0, shape=(), seed=5),
    dict(b=8, chunk=64, dtype=F32, log_t=math.log(10), bias=-10.0, shape=(1,), seed=6),
    dict(b=6, chunk=4, dtype=F32, log_t=math.log(5), bias=-2.0, shape=(), seed=7),
]
TOL = {F64: dict(rtol=1e-10, atol=1e-13), F32: dict(rtol=1e-5, atol=1e-6)}


def _data(case: Dict, world: int) -> List[torch.Tensor]:
    """Global raw inputs and shared parameters of a case, identical on every rank and in the test process."""
    g = torch.Generator().manual_seed(case["seed"])
    n = case["b"] * world
    raw_img, raw_txt = torch.randn(n, RAW, generator=g, dtype=F64), torch.randn(n, RAW, generator=g, dtype=F64)
    w_img, w_txt = torch.randn(RAW, DIM, generator=g, dtype=F64), torch.randn(RAW, DIM, generator=g, dtype=F64)
    scale = torch.full(case["shape"], case["log_t"], dtype=F64)
    bias = torch.full(case["shape"], case["bias"], dtype=F64)
    return [raw_img, raw_txt, w_img, w_txt, scale, bias]


def _step(data: List[torch.Tensor], rows: slice, loss_fn: Callable, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Embed ``rows`` with the toy tower, backprop ``loss_fn``; the loss, parameter and embedding grads."""
    raw_img, raw_txt, *params = (t.to(dtype) for t in data)
    params = [p.clone().requires_grad_() for p in params]
    w_img, w_txt, scale, bias = params
    img = F.normalize(raw_img[rows] @ w_img, dim=-1)
    txt = F.normalize(raw_txt[rows] @ w_txt, dim=-1)
    img.retain_grad()
    txt.retain_grad()
    loss = loss_fn(img, txt, scale, bias)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad}
    out.update({k: p.grad for k, p in zip(PARAMS, params) if p.grad is not None})
    return out


def _check_ddp(per_rank: List[Dict[str, torch.Tensor]], ref: Dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Mean loss and rank-averaged parameter grads equal the dense ones; each rank's embedding grads are W·∂L/∂emb."""
    w = len(per_rank)
    tol = TOL[dtype]
    got_loss = torch.stack([r["loss"] for r in per_rank]).to(F64).mean()
    torch.testing.assert_close(got_loss, ref["loss"], **tol)
    for k in ref:
        if k == "loss":
            continue
        if k in ("img", "txt"):
            got = torch.cat([r[k] for r in per_rank]).to(F64) / w
        else:  # what DDP's all_reduce-average leaves in every replica
            got = torch.stack([r[k] for r in per_rank]).to(F64).mean(0)
        scale = ref[k].abs().max().item()
        torch.testing.assert_close(got, ref[k], rtol=tol["rtol"], atol=max(tol["atol"], tol["rtol"] * scale),
                                   msg=lambda m, k=k: f"{k}: {m}")


def _dense_clip(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Dense CLIP loss on the global batch: mean of image→text and text→image cross-entropies."""
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _clip_fn(group=None) -> Callable:
    return lambda i, t, s, b: softmax_loss(i, t, s, group=group)


def _sig_fn(chunk, group=None, kernel="eager") -> Callable:
    return lambda i, t, s, b: chunked_sigmoid_loss(i, t, s, b, group=group, chunk_size=chunk, kernel=kernel)


def _reference(case: Dict, world: int, loss_fn: Callable = sigmoid_loss) -> Dict[str, torch.Tensor]:
    return _step(_data(case, world), slice(None), loss_fn, F64)


# --------------------------------------------------------------------------------------------- workers
# Top-level functions run on every rank by run_distributed. One launch of 4 processes covers W = 2, 3
# and 4: the loss runs on the default group (W=4) and on sub-groups {0,1,2} (odd W) and {2,3} (group
# ranks differ from global ranks), so group handling is tested too.
LAUNCH_W = 4
SUB_GROUPS = {4: None, 3: [0, 1, 2], 2: [2, 3]}


def _capture(fn: Callable) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _errors(rank: int) -> Dict[str, str]:
    """Bad inputs on one rank must raise the same ValueError on every rank, and leave the group usable."""
    s, b = torch.zeros(1), torch.zeros(1)
    n = 4 if rank == 0 else 3
    nan_img = F.normalize(torch.randn(4, DIM), dim=-1)
    if rank == 1:
        nan_img[2, 0] = float("nan")
    out = {
        "unequal": _capture(lambda: chunked_sigmoid_loss(torch.randn(n, DIM), torch.randn(n, DIM), s, b)),
        "nonfinite": _capture(lambda: chunked_sigmoid_loss(nan_img, torch.randn(4, DIM), s, b)),
        "shape": _capture(lambda: chunked_sigmoid_loss(torch.randn(4, DIM), torch.randn(4, DIM - (rank == 1)), s, b)),
        "softmax_unequal": _capture(lambda: softmax_loss(torch.randn(n, DIM), torch.randn(n, DIM), s)),
        "grad_mode": _capture(lambda: chunked_sigmoid_loss(torch.randn(4, DIM), torch.randn(4, DIM),
                                                           s.clone().requires_grad_(rank == 0), b)),
    }
    ok = chunked_sigmoid_loss(torch.randn(4, DIM), torch.randn(4, DIM), s, b)  # the ring still works afterwards
    out["after"] = "ok" if torch.isfinite(ok) else "bad"
    return out


def _open_clip_compare(rank: int, world: int, modes, group=None) -> Dict:
    """Per-rank loss and grads (img, txt, t', b) of ours and of open_clip's SigLipLoss on the same inputs."""
    from open_clip.loss import SigLipLoss

    b = 5
    g = torch.Generator().manual_seed(11)
    img_all = F.normalize(torch.randn(b * world, DIM, generator=g, dtype=F64), dim=-1)
    txt_all = F.normalize(torch.randn(b * world, DIM, generator=g, dtype=F64), dim=-1)
    rows = slice(rank * b, (rank + 1) * b)

    def run(fn):
        leaves = [img_all[rows].clone().requires_grad_(), txt_all[rows].clone().requires_grad_(),
                  torch.tensor([math.log(4.0)], dtype=F64, requires_grad=True),
                  torch.tensor([-2.0], dtype=F64, requires_grad=True)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    out = {"ours": run(lambda i, t, s, bb: chunked_sigmoid_loss(i, t, s, bb, group=group, chunk_size=3))}
    for mode in modes:  # open_clip takes t = exp(t'); it talks to ranks 0..world-1 of the default group
        oc = SigLipLoss(rank=rank, world_size=world, dist_impl=mode)
        out[mode] = run(lambda i, t, s, bb: oc(i, t, s.exp(), bb))
    return out


class _Toy(torch.nn.Module):
    """The toy towers plus temperature and bias as one module, for a real DistributedDataParallel run."""

    def __init__(self, w_img: torch.Tensor, w_txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.w_img, self.w_txt = torch.nn.Parameter(w_img.clone()), torch.nn.Parameter(w_txt.clone())
        self.logit_scale, self.logit_bias = torch.nn.Parameter(scale.clone()), torch.nn.Parameter(bias.clone())

    def forward(self, raw_img: torch.Tensor, raw_txt: torch.Tensor):
        return (F.normalize(raw_img @ self.w_img, dim=-1), F.normalize(raw_txt @ self.w_txt, dim=-1),
                self.logit_scale, self.logit_bias)


def _ddp_grads(rank: int, world: int, group, case: Dict) -> Dict[str, torch.Tensor]:
    """Parameter grads after DDP's own gradient averaging, with the loss on DDP's process group."""
    from torch.nn.parallel import DistributedDataParallel

    raw_img, raw_txt, *params = _data(case, world)
    model = DistributedDataParallel(_Toy(*params), process_group=group)
    rows = slice(rank * case["b"], (rank + 1) * case["b"])
    loss = chunked_sigmoid_loss(*model(raw_img[rows], raw_txt[rows]), group=group, chunk_size=case["chunk"])
    loss.backward()
    return {k: p.grad for k, p in zip(PARAMS, model.module.parameters())}


def _suite(rank: int, world: int, group) -> Dict:
    """Every comparison against a dense reference for one group of ``world`` ranks (this rank's part)."""
    out: Dict = {"cases": []}
    for case in CASES:
        out["cases"].append(_step(_data(case, world), slice(rank * case["b"], (rank + 1) * case["b"]),
                                   _sig_fn(case["chunk"], group), case["dtype"]))
    case = CASES[2]
    out["softmax"] = _step(_data(case, world), slice(rank * case["b"], (rank + 1) * case["b"]), _clip_fn(group), F64)
    img, txt = F.normalize(torch.randn(6, DIM), dim=-1), F.normalize(torch.randn(6, DIM), dim=-1)
    s, b = torch.tensor([1.0]), torch.tensor([-1.0])
    out["stats"] = chunked_sigmoid_loss(img, txt, s, b, group=group, return_stats=True)[1]
    out["stats_inputs"] = (img, txt)
    out["ddp"] = _ddp_grads(rank, world, group, CASES[2])
    return out


def _ring_worker(rank: int, world: int) -> Dict:
    """Everything multi-process, in one launch of LAUNCH_W ranks."""
    groups = {w: (None if ranks is None else dist.new_group(ranks)) for w, ranks in SUB_GROUPS.items()}
    prefix2 = dist.new_group([0, 1])  # open_clip's rings need ranks 0..W-1 of the default group
    out: Dict = {"suite": {}, "open_clip": {}}
    for w, ranks in SUB_GROUPS.items():
        ranks = ranks or list(range(world))
        if rank in ranks:
            out["suite"][w] = _suite(ranks.index(rank), w, groups[w])
    out["open_clip"][4] = _open_clip_compare(rank, 4, ("bidir", "shift", "reduce", "gather"))
    if rank < 3:  # open_clip's reduce/gather need the whole default group; its ring modes run on prefixes
        out["open_clip"][3] = _open_clip_compare(rank, 3, ("bidir", "shift"), groups[3])
    if rank < 2:
        out["open_clip"][2] = _open_clip_compare(rank, 2, ("bidir", "shift"), prefix2)
    out["errors"] = _errors(rank)
    return out


@pytest.fixture(scope="module")
def ring() -> List[Dict]:
    return run_distributed(_ring_worker, LAUNCH_W)


def _members(results: List[Dict], w: int) -> List[Dict]:
    """The results of the ranks of the W=w group, in group-rank order."""
    return [results[r]["suite"][w] for r in (SUB_GROUPS[w] or range(LAUNCH_W))]


# --------------------------------------------------------------------------------------------- W = 1

@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c['b']}-c{c['chunk']}-{str(c['dtype'])[6:]}")
def test_single_process_matches_dense(case):
    got = _step(_data(case, 1), slice(None), _sig_fn(case["chunk"]), case["dtype"])
    _check_ddp([got], _reference(case, 1), case["dtype"])


def test_matches_dense_on_a_larger_batch_fp32():
    case = dict(b=300, chunk=64, dtype=F32, log_t=math.log(10), bias=-10.0, shape=(1,), seed=9)
    got = _step(_data(case, 1), slice(None), _sig_fn(case["chunk"]), F32)
    _check_ddp([got], _reference(case, 1), F32)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_compiled_kernel_matches_dense(dtype):
    """train.loss_kernel=compiled: the fused elementwise pass (torch.compile) keeps the reference's exactness."""
    case = dict(b=32, chunk=16, dtype=dtype, log_t=math.log(10), bias=-10.0, shape=(1,), seed=11)
    got = _step(_data(case, 1), slice(None), _sig_fn(case["chunk"], kernel="compiled"), dtype)
    _check_ddp([got], _reference(case, 1), dtype)


def test_unknown_kernel_is_refused():
    x = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match=r"kernel='fused' is not one of \['eager', 'compiled'\]"):
        chunked_sigmoid_loss(x, x, torch.zeros(1), torch.zeros(1), kernel="fused")


def test_half_precision_inputs_compute_in_fp32():
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(40, DIM, generator=g), dim=-1) for _ in range(2))
    s, b = torch.tensor([math.log(10.0)]), torch.tensor([-10.0])
    ref = sigmoid_loss(img.double(), txt.double(), s.double(), b.double())
    i16, t16 = img.bfloat16().requires_grad_(), txt.bfloat16().requires_grad_()
    loss = chunked_sigmoid_loss(i16, t16, s, b, chunk_size=16)
    loss.backward()
    assert i16.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), sigmoid_loss(i16.double(), t16.double(), s.double(), b.double()),
                               rtol=1e-5, atol=0)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_autocast_does_not_lower_the_loss_precision():
    case = CASES[5]
    data = _data(case, 1)

    def loss_fn(i, t, s, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_sigmoid_loss(i, t, s, b, chunk_size=case["chunk"])

    _check_ddp([_step(data, slice(None), loss_fn, F32)], _reference(case, 1), F32)


def test_no_grad_and_partial_requires_grad():
    case = CASES[2]
    raw_img, raw_txt, w_img, w_txt, s, b = _data(case, 1)
    img, txt = F.normalize(raw_img @ w_img, dim=-1), F.normalize(raw_txt @ w_txt, dim=-1)
    with torch.no_grad():
        loss = chunked_sigmoid_loss(img, txt, s, b, chunk_size=3)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, sigmoid_loss(img, txt, s, b))
    txt = txt.clone().requires_grad_()  # only the texts train (e.g. a locked image tower)
    chunked_sigmoid_loss(img, txt, s, b, chunk_size=3).backward()
    ref_txt = txt.detach().clone().requires_grad_()
    sigmoid_loss(img, ref_txt, s, b).backward()
    torch.testing.assert_close(txt.grad, ref_txt.grad)


def test_grad_output_scaling_is_linear():
    case = CASES[1]
    data = _data(case, 1)
    got = _step(data, slice(None), lambda i, t, s, b: 3.5 * chunked_sigmoid_loss(i, t, s, b, chunk_size=2), F64)
    ref = _step(data, slice(None), lambda i, t, s, b: 3.5 * sigmoid_loss(i, t, s, b), F64)
    _check_ddp([got], ref, F64)


def test_open_clip_single_process():
    out = _open_clip_compare(0, 1, ("bidir", "shift", "reduce", "gather"))
    assert set(out) == {"ours", "bidir", "shift", "reduce", "gather"}
    for mode in ("bidir", "shift", "reduce", "gather"):  # at W=1 every mode is the dense local loss
        for a, b in zip(out["ours"], out[mode]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_stats_match_dense_means():
    g = torch.Generator().manual_seed(3)
    img, txt = (F.normalize(torch.randn(9, DIM, generator=g), dim=-1) for _ in range(2))
    s, b = torch.tensor([1.5]), torch.tensor([-4.0])
    loss, stats = chunked_sigmoid_loss(img, txt, s, b, chunk_size=4, return_stats=True)
    logits = img @ txt.T * s.exp() + b
    eye = torch.eye(9, dtype=torch.bool)
    torch.testing.assert_close(stats["pos_logit"], logits[eye].mean())
    torch.testing.assert_close(stats["neg_logit"], logits[~eye].mean())
    torch.testing.assert_close(stats["t"], s.exp()[0])
    torch.testing.assert_close(stats["b"], b[0])
    assert not stats["t"].requires_grad


def test_softmax_single_process_matches_dense():
    case = CASES[2]
    got = _step(_data(case, 1), slice(None), _clip_fn(), F64)
    _check_ddp([got], _reference(case, 1, lambda i, t, s, b: _dense_clip(i, t, s)), F64)


def test_default_chunk_size_bounds_the_logit_block():
    for b in (1, 100, 4096, 16384, 65536):
        c = default_chunk_size(b)
        assert c >= 256 and (b * c <= 2**24 or c == 256)


@pytest.mark.parametrize("bad, match", [
    (lambda x, y, s, b: (x, y[:, :-1], s, b), r"img and txt shapes differ.*one text per image"),
    (lambda x, y, s, b: (x, y[:-1], s, b), r"img and txt shapes differ"),
    (lambda x, y, s, b: (x[0], y[0], s, b), r"must be 2-D \(local_batch, dim\)"),
    (lambda x, y, s, b: (x.long(), y, s, b), r"floating point"),
    (lambda x, y, s, b: (x.index_fill(0, torch.tensor([1]), float("nan")), y, s, b), r"non-finite.*in img on rank"),
    (lambda x, y, s, b: (x, y.index_fill(0, torch.tensor([1]), float("inf")), s, b), r"non-finite.*in txt"),
    (lambda x, y, s, b: (x, y, s * float("inf"), b), r"non-finite.*logit_scale.*clip"),
    (lambda x, y, s, b: (x, y, torch.zeros(2), b), r"logit_scale and logit_bias must hold one value"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    x, y = F.normalize(torch.randn(4, DIM), dim=-1), F.normalize(torch.randn(4, DIM), dim=-1)
    with pytest.raises(ValueError, match=match):
        chunked_sigmoid_loss(*bad(x, y, torch.ones(1), torch.zeros(1)))


def test_validate_false_lets_nan_through():
    """The training loop skips non-finite steps itself, so with validate=False NaN is returned, not raised."""
    x = F.normalize(torch.randn(4, DIM), dim=-1)
    x[1, 0] = float("nan")
    assert chunked_sigmoid_loss(x, x, torch.ones(1), torch.zeros(1), validate=False).isnan()
    assert softmax_loss(x, x, torch.ones(1), validate=False).isnan()
    with pytest.raises(ValueError, match="non-finite"):
        softmax_loss(x, x, torch.ones(1))


def test_bad_chunk_size():
    x = torch.randn(4, DIM)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunked_sigmoid_loss(x, x, torch.ones(1), torch.zeros(1), chunk_size=0)


def test_memory_is_O_b_chunk_not_O_bB():
    """Neither the tensors saved for backward nor the live peak may reach one b×B logit matrix."""
    from sigscale.bench_loss import peak_tensor_bytes

    b, d, chunk = 1024, 16, 64
    logit_matrix = b * b * 4  # fp32 b×B with B = b at W = 1: 4 MiB
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_() for _ in range(2))
    s, bias = torch.tensor([math.log(10.0)], requires_grad=True), torch.tensor([-10.0], requires_grad=True)

    def saved_bytes(fn) -> int:
        sizes: List[int] = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    chunked = lambda: chunked_sigmoid_loss(img, txt, s, bias, chunk_size=chunk)  # noqa: E731
    dense = lambda: sigmoid_loss(img, txt, s, bias)  # noqa: E731
    # The hooks see the dense reference's b×b matrices, so this measurement can fail.
    assert saved_bytes(dense) >= logit_matrix
    assert saved_bytes(chunked) <= 2 * b * d * 4 + 64  # just d_img, d_txt, d_t', d_b
    _, peak_chunked = peak_tensor_bytes(lambda: chunked().backward())
    _, peak_dense = peak_tensor_bytes(lambda: dense().backward())
    assert peak_dense >= logit_matrix
    assert peak_chunked < logit_matrix / 2, (peak_chunked, logit_matrix)


# --------------------------------------------------------------------------------------------- W > 1
WS = [2, 3, 4]


@pytest.mark.multiproc
@pytest.mark.parametrize("w", WS)
def test_ring_matches_dense_with_ddp_averaging(ring, w):
    for k, case in enumerate(CASES):
        _check_ddp([r["cases"][k] for r in _members(ring, w)], _reference(case, w), case["dtype"])


@pytest.mark.multiproc
@pytest.mark.parametrize("w", WS)
def test_real_ddp_gradients_equal_dense(ring, w):
    ref = _reference(CASES[2], w)
    for r in _members(ring, w):  # DDP already averaged: every replica must hold exactly the dense gradient
        for k in PARAMS:
            torch.testing.assert_close(r["ddp"][k], ref[k], rtol=1e-10, atol=1e-13, msg=lambda m: f"{k}: {m}")


@pytest.mark.multiproc
@pytest.mark.parametrize("w", WS)
def test_ring_matches_open_clip(ring, w):
    modes = ("bidir", "shift", "reduce", "gather") if w == LAUNCH_W else ("bidir", "shift")
    for r in ring[:w]:
        got = r["open_clip"][w]
        assert set(got) == {"ours", *modes}
        for mode in modes:
            for name, a, b in zip(("loss", "img", "txt", "t'", "b"), got["ours"], got[mode]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"{mode} {name}: {m}")


@pytest.mark.multiproc
@pytest.mark.parametrize("w", WS)
def test_ring_stats_average_to_global_means(ring, w):
    members = _members(ring, w)
    img = torch.cat([r["stats_inputs"][0] for r in members])
    txt = torch.cat([r["stats_inputs"][1] for r in members])
    logits = img @ txt.T * math.e - 1.0
    eye = torch.eye(len(img), dtype=torch.bool)
    for key, want in (("pos_logit", logits[eye].mean()), ("neg_logit", logits[~eye].mean())):
        torch.testing.assert_close(torch.stack([r["stats"][key] for r in members]).mean(), want)


@pytest.mark.multiproc
@pytest.mark.parametrize("w", WS)
def test_softmax_matches_dense_clip(ring, w):
    ref = _reference(CASES[2], w, lambda i, t, s, b: _dense_clip(i, t, s))
    _check_ddp([r["softmax"] for r in _members(ring, w)], ref, F64)


@pytest.mark.multiproc
def test_bad_inputs_raise_on_every_rank(ring):
    for res in ring:
        e = res["errors"]
        assert "local batches differ across ranks" in e["unequal"], e["unequal"]
        assert "[(4, 8), (3, 8), (3, 8), (3, 8)]" in e["unequal"] and "drop_last=True" in e["unequal"]
        assert "non-finite values (NaN/Inf) in img on rank(s) 1;" in e["nonfinite"], e["nonfinite"]
        assert "shapes differ on rank(s) 1 " in e["shape"], e["shape"]
        assert "local batches differ" in e["softmax_unequal"]
        assert "grad mode differs across ranks (enabled on rank(s) 0)" in e["grad_mode"], e["grad_mode"]
        assert e["after"] == "ok"


@pytest.mark.multiproc
def test_bench_smoke(tmp_path):
    from sigscale.bench_loss import IMPLS, render_markdown, run_loss_bench

    out = tmp_path / "loss.json"
    results = run_loss_bench(out, quick=True)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(results))
    assert {(p["world_size"], p["status"]) for p in data["points"]} == {(1, "ok"), (2, "ok")}
    for p in data["points"]:
        assert set(p["impls"]) == set(IMPLS)
        losses = []
        for impl, r in p["impls"].items():
            assert r["status"] == "ok", (impl, r)
            assert math.isfinite(r["time_median_s"]) and r["time_median_s"] > 0
            assert r["peak_bytes_max"] > 0 and len(r["peak_bytes_per_rank"]) == p["world_size"]
            losses.append(r["loss_mean"])
        assert max(losses) - min(losses) < 1e-4 * abs(losses[0])  # every impl computes the same loss
    table = render_markdown(results)
    assert all(impl in table for impl in IMPLS) and "peak live tensor bytes" in table
