"""Contrastive losses: the dense SigLIP reference, the chunked ring SigLIP loss, and CLIP's softmax loss.

All losses take L2-normalised embeddings, the log-temperature ``logit_scale`` (t' with t = exp(t'))
and, for the sigmoid loss, the bias ``logit_bias``; both may be 0-dim or shape (1,) (the model keeps
(1,) because FSDP2 rejects 0-dim parameters).

Distributed convention (identical for every loss here, and for open_clip's ``SigLipLoss``): rank r
holds a local batch of b = B/W pairs and returns L_r = (1/b) Σ_{i local} Σ_{j global} ℓ_ij, so
mean_r L_r is the loss L of the global batch. Backward gives rank r

* for its own embeddings: ∂(Σ_s L_s)/∂(its embeddings), i.e. contributions from every rank's loss,
  summed exactly once on the owner (= W · ∂L/∂(its embeddings));
* for ``logit_scale`` / ``logit_bias``: ∂L_r/∂(·), rank r's share.

So after DDP/FSDP average parameter gradients over the W ranks (Σ_r ... / W), every parameter,
upstream towers included, holds exactly ∇L of the dense loss on the global batch.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from sigscale.pretrain.config import LOSS_KERNELS

__all__ = ["sigmoid_loss", "chunked_sigmoid_loss", "ring_sigmoid_loss", "sigmoid_block", "softmax_loss", "all_gather_with_grad", "default_chunk_size"]

Group = Optional["dist.ProcessGroup"]
# The ring's transport: posts (tensor, peer, tag) sends and receives, returns works to wait on.
Exchange = Callable[[Sequence[Tuple[Tensor, int, int]], Sequence[Tuple[Tensor, int, int]]], List]

# Chunk budget: one b×chunk fp32 logit block is at most 2**24 elements (64 MiB), which keeps the
# per-block matmuls large (fast on CPU and GPU) while memory stays O(b·chunk), never O(b·B).
CHUNK_ELEMENTS = 2**24
MIN_CHUNK = 256


def default_chunk_size(local_batch: int) -> int:
    """Texts per block when ``chunk_size=None``: as many as fit the CHUNK_ELEMENTS logit budget."""
    return max(MIN_CHUNK, CHUNK_ELEMENTS // max(1, local_batch))


def sigmoid_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """Dense single-device SigLIP loss −(1/B) Σ_ij log σ(z_ij (t x_i·y_j + b)): the oracle for tests."""
    logits = img @ txt.T * logit_scale.exp() + logit_bias
    z = 2 * torch.eye(img.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def _rank_world(group: Group) -> Tuple[int, int]:
    """Rank and size of ``group``; None means the default group, or one process if none is initialised."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _validate(name: str, img: Tensor, txt: Tensor, scalars: Dict[str, Tensor], group: Group,
              world: int, want_grad: bool) -> None:
    """Raise the same ValueError on every rank for bad inputs; one tiny all_gather, so no rank hangs."""
    for label, t in (("img", img), ("txt", txt), *scalars.items()):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
    two_d = img.dim() == 2 and txt.dim() == 2
    info = [
        int(two_d),
        *(img.shape if img.dim() == 2 else (-1, -1)),
        *(txt.shape if txt.dim() == 2 else (-1, -1)),
        int(img.is_floating_point() and txt.is_floating_point()),
        int(all(s.numel() == 1 for s in scalars.values())),
        int(want_grad),
    ]
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in (img, txt, *scalars.values())]).to(torch.long)
    mine = torch.cat([torch.tensor(info, dtype=torch.long, device=finite.device), finite])
    if world > 1:
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        rows = [p.tolist() for p in parts]
    else:
        rows = [mine.tolist()]

    def ranks(pred) -> str:
        return ", ".join(str(r) for r, row in enumerate(rows) if pred(row))

    if bad := ranks(lambda r: not r[0]):
        raise ValueError(f"{name}: img and txt must be 2-D (local_batch, dim) embeddings (bad on rank(s) {bad}; "
                         f"this rank: img {tuple(img.shape)}, txt {tuple(txt.shape)}); pool or flatten "
                         f"token features before the loss")
    if bad := ranks(lambda r: (r[1], r[2]) != (r[3], r[4])):
        raise ValueError(f"{name}: img and txt shapes differ on rank(s) {bad} (this rank: img {tuple(img.shape)}, "
                         f"txt {tuple(txt.shape)}); pass exactly one text per image and give both towers the "
                         f"same embedding dim")
    if bad := ranks(lambda r: not r[5]):
        raise ValueError(f"{name}: img and txt must be floating point (bad on rank(s) {bad}; this rank: "
                         f"{img.dtype}, {txt.dtype})")
    if bad := ranks(lambda r: not r[6]):
        raise ValueError(f"{name}: logit_scale and logit_bias must hold one value each, shape () or (1,) "
                         f"(bad on rank(s) {bad}; this rank: "
                         + ", ".join(f"{k} {tuple(v.shape)}" for k, v in scalars.items()) + ")")
    if len({(r[1], r[2]) for r in rows}) > 1:
        raise ValueError(f"{name}: local batches differ across ranks (batch, dim) per rank: "
                         f"{[(r[1], r[2]) for r in rows]}; the distributed loss needs equal local batches: "
                         f"make the global batch divisible by the world size and drop the last partial batch "
                         f"(drop_last=True)")
    if len({r[7] for r in rows}) > 1:
        raise ValueError(f"{name}: grad mode differs across ranks (enabled on rank(s) {ranks(lambda r: r[7])}); "
                         f"call the loss under the same torch.no_grad()/requires_grad setting everywhere")
    for k, label in enumerate(["img", "txt", *scalars]):
        if bad := ranks(lambda r: not r[8 + k]):
            raise ValueError(f"{name}: non-finite values (NaN/Inf) in {label} on rank(s) {bad}; the towers or "
                             f"the temperature diverged: lower the learning rate, check mixed precision, clip "
                             f"logit_scale, or skip the bad batch")


def _p2p(sends: Sequence[Tuple[Tensor, int, int]], recvs: Sequence[Tuple[Tensor, int, int]],
         group: Group) -> List:
    """Post (tensor, group_peer, tag) sends and receives as one batch; grouping keeps NCCL rings deadlock-free."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p, tag=tag) for t, p, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p, tag=tag) for t, p, tag in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: List) -> None:
    for w in works:
        w.wait()


def _negative_pass(logit: Tensor) -> Tuple[Tensor, Tensor]:
    """Σ softplus(logit) and Σ σ(logit); ``logit`` becomes σ(logit) in place (the gradient block)."""
    loss = F.softplus(logit).sum()  # in the block's dtype: an fp64 sum would first copy the block to fp64
    g = logit.sigmoid_()
    return loss, g.sum()


@functools.lru_cache(maxsize=None)
def _compiled_negative_pass() -> Callable[[Tensor], Tuple[Tensor, Tensor]]:
    """``_negative_pass`` as one fused kernel (train.loss_kernel=compiled).

    Eager, the elementwise work is several passes over each b×c block (softplus, its sum, sigmoid, the
    gradient sum); compiled, one pass reads the logits once and yields the loss sum, the gradient block
    and its sum. The matmuls are the same either way.
    """
    # dynamic=False: a block has at most two shapes (full and last chunk), each compiled once per process.
    return torch.compile(_negative_pass, dynamic=False)


def warm_compiled_kernel(rows: int, widths: Sequence[int], dtype: torch.dtype = torch.float32,
                         device: Optional[torch.device] = None) -> None:
    """Compile the ``kernel="compiled"`` block pass for (rows, w) blocks now, so that a timed pass does not."""
    fn = _compiled_negative_pass()
    with torch.no_grad():  # as inside the ring's forward: grad mode is one of the compiled graph's guards
        for w in sorted(set(widths)):
            fn(torch.zeros(rows, w, dtype=dtype, device=device))


def sigmoid_block(xt: Tensor, y: Tensor, bias: Tensor, chunk: int, dx: Optional[Tensor], dy: Optional[Tensor],
                  positives: bool, kernel: str = "eager") -> Tuple[Tensor, Tensor, Tensor]:
    """Loss sum of images xt = t·x against texts y, chunk by chunk; fused analytic gradients into dx, dy.

    With G = ∂ℓ/∂logit = σ(logit) − [i==j] (negatives: ℓ = softplus(logit); positives: softplus(−logit)):
    dx += G·y (times t later), dy = Gᵀ·(t·x); returns (loss sum, Σ G, Σ positive logits), 0-dim tensors.
    ``positives`` marks y as the rank's own texts, so the diagonal i == j holds the positive pairs.
    """
    loss = xt.new_zeros((), dtype=torch.float64)
    gsum, pos = xt.new_zeros(()), xt.new_zeros(())
    elementwise = _compiled_negative_pass() if kernel == "compiled" else _negative_pass
    for j0 in range(0, y.shape[0], chunk):
        yc = y[j0:j0 + chunk]
        logit = torch.addmm(bias, xt, yc.T)  # b×c, bias fused into the matmul
        d = logit.diagonal(-j0).clone() if positives else None
        if dx is None:
            loss += F.softplus(logit).sum()
        else:
            block_loss, block_gsum = elementwise(logit)  # logit now holds σ(logit): one b×c block alive
            loss += block_loss
            gsum += block_gsum
        if positives:  # swap the diagonal's negative term softplus(l) for the positive one softplus(−l)
            loss += (F.softplus(-d) - F.softplus(d)).sum()
            pos += d.sum()
            if dx is not None:
                diag, fixed = logit.diagonal(-j0), -torch.sigmoid(-d)  # σ(l) − 1 without cancellation
                gsum += (fixed - diag).sum()
                diag.copy_(fixed)
        if dx is None:
            continue
        dx.addmm_(logit, yc)
        torch.mm(logit.T, xt, out=dy[j0:j0 + chunk])
    return loss, gsum, pos


class _SigmoidRing(torch.autograd.Function):
    """Chunked SigLIP loss over a ring of ranks with gradients computed in the forward pass.

    The loss is a scalar, so its gradients are fixed once the forward pass has seen every logit: the
    forward computes them block by block (SigLIP, arXiv 2303.15343 §3.3: "chunked" implementation,
    texts travel between neighbours) and stores only O(b·d) gradient tensors, which backward scales
    by the incoming grad. This costs 3 matmuls per block (like plain autograd) instead of 4 with
    recomputation, and backward needs no communication. The remote texts' gradients travel with the
    texts around the ring and arrive at their owner after a final hop, summed exactly once.
    """

    @staticmethod
    def forward(ctx, img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor, exchange: Exchange,
                rank: int, world: int, chunk: int, want_grad: bool, kernel: str) -> Tuple[Tensor, Tensor]:
        # Half precision inputs are computed in fp32: bf16 logits at t≈100 would be off by ~0.5.
        cdtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
        x = img.to(cdtype)
        t = logit_scale.detach().to(cdtype).reshape(()).exp()
        bias = logit_bias.detach().to(cdtype).reshape(1)
        xt = x * t
        b = x.shape[0]
        dx = torch.zeros_like(xt) if want_grad else None
        dy = torch.empty_like(xt) if want_grad else None

        # Bidirectional ring: the first half of each rank's texts travels right, the second half left;
        # both links of every neighbour pair carry data at once, halving per-step traffic.
        h = (b + 1) // 2
        streams = [(s, lo, hi) for s, (lo, hi) in enumerate([(0, h), (h, b)]) if hi > lo] if world > 1 else []
        nxt = [(rank + 1) % world, (rank - 1) % world]  # stream 0 moves right, stream 1 left
        prv = [(rank - 1) % world, (rank + 1) % world]
        held = [txt[lo:hi].contiguous() for _, lo, hi in streams]
        incoming = [torch.empty_like(y) for y in held]
        text_works = exchange([(y, nxt[s], 2 * s) for y, (s, _, _) in zip(held, streams)],
                              [(y, prv[s], 2 * s) for y, (s, _, _) in zip(incoming, streams)])

        # Own texts first (positives + negatives); the first remote blocks are in flight meanwhile.
        y_own = txt.to(cdtype)
        loss, gsum, pos = sigmoid_block(xt, y_own, bias, chunk, dx, dy, positives=True, kernel=kernel)
        ysum = y_own.sum(0)

        acc_in: List[Optional[Tensor]] = [None] * len(streams)
        acc_works: List = []
        for step in range(1, world):  # at step k rank r holds texts of ranks r−k (stream 0) and r+k (stream 1)
            _wait(text_works)
            held = incoming
            text_works = []
            if step < world - 1:
                incoming = [torch.empty_like(y) for y in held]
                text_works = exchange([(y, nxt[s], 2 * s) for y, (s, _, _) in zip(held, streams)],
                                      [(y, prv[s], 2 * s) for y, (s, _, _) in zip(incoming, streams)])
            contrib = []
            for y_send, _ in zip(held, streams):
                y = y_send.to(cdtype)
                c = torch.empty_like(y) if want_grad else None
                lsum, gs, _ = sigmoid_block(xt, y, bias, chunk, dx, c, positives=False, kernel=kernel)
                loss += lsum
                gsum += gs
                ysum += y.sum(0)
                contrib.append(c)
            if want_grad:  # add upstream ranks' gradient for these texts, pass it on (home after the last hop)
                _wait(acc_works)
                for c, a in zip(contrib, acc_in):
                    if a is not None:
                        c += a
                acc_in = [torch.empty_like(c) for c in contrib]
                acc_works = exchange([(c, nxt[s], 2 * s + 1) for c, (s, _, _) in zip(contrib, streams)],
                                     [(a, prv[s], 2 * s + 1) for a, (s, _, _) in zip(acc_in, streams)])
        if want_grad and streams:
            _wait(acc_works)
            for a, (_, lo, hi) in zip(acc_in, streams):
                dy[lo:hi] += a

        # Log-friendly extras: mean positive / negative logit without any logit matrix (Σ_ij x_i·y_j = Σx·Σy).
        n_all = b * b * world
        total = xt.sum(0) @ ysum + bias[0] * n_all
        neg = (total - pos) / (n_all - b) if n_all > b else torch.full_like(total, float("nan"))
        stats = torch.stack([pos / b, neg, t, bias[0]]).detach()

        if want_grad:
            inv_b = 1.0 / b
            d_scale = (xt * dx).sum() * inv_b  # ∂/∂t' = Σ G·t·x·y = ⟨t·x, G·y⟩
            d_bias = gsum * inv_b
            dx.mul_(t * inv_b)
            dy.mul_(inv_b)
            ctx.save_for_backward(dx.to(img.dtype), dy.to(txt.dtype), d_scale.to(logit_scale.dtype),
                                  d_bias.to(logit_bias.dtype))
            ctx.shapes = (logit_scale.shape, logit_bias.shape)
        ctx.mark_non_differentiable(stats)
        return (loss / b).to(cdtype), stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):
        d_img, d_txt, d_scale, d_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        # The ring summed other ranks' text-gradient contributions in forward assuming every rank's loss
        # gets the same grad_loss (true for loss scaling and gradient accumulation alike).
        return (grad_loss * d_img if need[0] else None,
                grad_loss * d_txt if need[1] else None,
                (grad_loss * d_scale).reshape(ctx.shapes[0]) if need[2] else None,
                (grad_loss * d_bias).reshape(ctx.shapes[1]) if need[3] else None,
                None, None, None, None, None, None)


def chunked_sigmoid_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    group: Group = None,
    chunk_size: Optional[int] = None,
    *,
    return_stats: bool = False,
    validate: bool = True,
    kernel: str = "eager",
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """SigLIP loss of this rank's images against all texts of ``group``, in O(b·(d + chunk)) memory.

    Args:
        img, txt: this rank's L2-normalised embeddings, (b, d) each; equal b on every rank.
        logit_scale: log-temperature t' (t = exp(t')), shape () or (1,).
        logit_bias: bias b, shape () or (1,).
        group: process group whose ranks share the global batch; None = the default group when
            torch.distributed is initialised, else a single process (W = 1).
        chunk_size: texts per logit block (None: ``default_chunk_size(b)``); only a b×chunk block
            is alive at any time and none is stored for backward.
        return_stats: also return detached {"pos_logit", "neg_logit", "t", "b"} (this rank's mean
            positive / negative logit; their mean over ranks is the global mean).
        validate: check shapes, equal local batches and finiteness on all ranks (one tiny
            all_gather), raising the same ValueError everywhere instead of hanging.
        kernel: "eager" (reference) or "compiled" (the block's elementwise work fused by
            torch.compile; see ``LOSS_KERNELS``).

    Returns L_r = (1/b) Σ_{i local} Σ_{j global} ℓ_ij; mean over ranks = the dense loss on the global
    batch. Gradients (see module docstring): own embeddings get ∂(Σ_s L_s)/∂(·) (every rank's
    contribution summed once on the owner), logit_scale/logit_bias get ∂L_r/∂(·); averaging
    parameter gradients over ranks as DDP/FSDP do gives exactly ∇L. Backward assumes every rank
    scales its loss by the same factor (loss scaling, gradient accumulation), since remote text
    gradients are summed during the forward pass.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunked_sigmoid_loss: chunk_size must be a positive int or None, got {chunk_size!r}")
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"chunked_sigmoid_loss: kernel={kernel!r} is not one of {list(LOSS_KERNELS)}")
    rank, world = _rank_world(group)
    want_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (img, txt, logit_scale, logit_bias))
    if validate:
        _validate("chunked_sigmoid_loss", img, txt, {"logit_scale": logit_scale, "logit_bias": logit_bias},
                  group, world, want_grad)
    chunk = chunk_size or default_chunk_size(img.shape[0])
    # The forward picks its own precision (fp32 or better); autocast would push the logit matmuls to bf16.
    with torch.autocast(img.device.type, enabled=False):
        loss, stats = _SigmoidRing.apply(img, txt, logit_scale, logit_bias, functools.partial(_p2p, group=group),
                                         rank, world, chunk, want_grad, kernel)
    if not return_stats:
        return loss
    return loss, dict(zip(("pos_logit", "neg_logit", "t", "b"), stats.unbind()))


def ring_sigmoid_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor, exchange: Exchange,
                      rank: int, world: int, chunk_size: Optional[int] = None, kernel: str = "eager") -> Tensor:
    """``chunked_sigmoid_loss``'s ring over a caller's ``exchange`` instead of a process group, unvalidated.

    A benchmark simulates the other ranks of a large ring with it (sigscale.bench_gpu.SimulatedRing):
    their texts arrive through the same buffers, blocks and gradient hops the real ranks run.
    """
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (img, txt, logit_scale, logit_bias))
    with torch.autocast(img.device.type, enabled=False):
        loss, _ = _SigmoidRing.apply(img, txt, logit_scale, logit_bias, exchange, rank, world,
                                     chunk_size or default_chunk_size(img.shape[0]), want_grad, kernel)
    return loss


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums each rank's gradient for them on their owner."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        else:  # gloo has no reduce_scatter: sum everything, keep our rows
            dist.all_reduce(grad, group=ctx.group)
            mine = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return mine, None


def all_gather_with_grad(x: Tensor, group: Group = None) -> Tensor:
    """(W·n, ...) concatenation of every rank's (n, ...) ``x``, differentiable: the softmax loss's gather."""
    return _AllGather.apply(x, group)


def softmax_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, group: Group = None, *,
                 validate: bool = True) -> Tensor:
    """CLIP's symmetric softmax (InfoNCE) loss, same conventions as the sigmoid loss, for ablations.

    Each rank all-gathers embeddings with gradient and computes the cross-entropy of its own rows in
    both directions: L_r = (1/2b) Σ_{i local} [CE(t x_i·Y) + CE(t y_i·X)]; mean over ranks = the
    global CLIP loss, and the gather's backward sums every rank's contribution on the owner.
    ``validate`` as in ``chunked_sigmoid_loss``.
    """
    rank, world = _rank_world(group)
    if validate:
        want_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                                    for t in (img, txt, logit_scale))
        _validate("softmax_loss", img, txt, {"logit_scale": logit_scale}, group, world, want_grad)
    all_img, all_txt = (all_gather_with_grad(img, group), all_gather_with_grad(txt, group)) if world > 1 else (img, txt)
    t = logit_scale.reshape(()).exp()
    labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    return 0.5 * (F.cross_entropy(t * img @ all_txt.T, labels) + F.cross_entropy(t * txt @ all_img.T, labels))
