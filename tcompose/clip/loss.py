"""CLIP's contrastive loss (InfoNCE) for train-clip, on one process or several (global negatives).

:func:`info_nce` is CLIP's symmetric loss, optionally with same-label pairs as positives (``--dedupe-labels``);
:func:`info_nce_local` is one slice of a batch against the whole batch. Over several processes each computes
the loss of its own rows against the gathered global batch (:func:`distributed_info_nce`, open_clip's
``local_loss=True, gather_with_grad=True``):

    rank r:  L_r = info_nce_local(img_r, txt_r, IMG, TXT, s, offset = r * b)      IMG = [img_0; ...; img_{W-1}]

The mean of ``L_r`` over ranks equals :func:`info_nce` on the concatenated batch. The gather is
differentiable: its backward sums, over all ranks, the gradients that reach each rank's slice, so rank r's
gradient wrt ``img_r`` is ``W * dL/d img_r``; DDP's gradient averaging (``/ W``) then leaves every parameter
with exactly the gradient of the global loss. Rank and world size are passed in, never read from globals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row cross-entropy against a target distribution: ``-(target * log_softmax(logits)).sum(-1)``."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


def info_nce_local(
    image_emb: Tensor,
    text_emb: Tensor,
    all_image_emb: Tensor,
    all_text_emb: Tensor,
    logit_scale: Tensor | float,
    offset: int,
    labels: Tensor | None = None,
    all_labels: Tensor | None = None,
) -> Tensor:
    """The symmetric CLIP loss of a slice of the batch against the whole batch (open_clip's ``local_loss``).

    ``image_emb`` / ``text_emb [b, D]`` are the pairs at rows ``offset .. offset + b`` of ``all_image_emb`` /
    ``all_text_emb [N, D]``. Each local image is classified among all N texts and each local text among all N
    images: ``(mean_i CE(s * img_i . TXT, target_i) + mean_i CE(s * txt_i . IMG, target_i)) / 2`` on
    L2-normalised embeddings, in float32 (float64 stays float64). Target: the pair's own column
    (``offset + i``); with ``labels [b]`` / ``all_labels [N]``, uniform over every column of the same label
    (the supervised-contrastive "L_out" form of Khosla et al. 2020), which equals the plain loss when the
    labels are distinct. The mean over slices that tile the batch equals :func:`info_nce` on the whole batch.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image and text embeddings must both be [B, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if all_image_emb.shape != all_text_emb.shape or all_image_emb.shape[1:] != image_emb.shape[1:]:
        raise ValueError(f"global embeddings {tuple(all_image_emb.shape)} / {tuple(all_text_emb.shape)} do not match the local {tuple(image_emb.shape)}")
    b, n = image_emb.shape[0], all_image_emb.shape[0]
    if not 0 <= offset <= n - b:
        raise ValueError(f"offset {offset} puts {b} local rows outside the {n}-row batch")
    dtype = torch.float64 if image_emb.dtype == torch.float64 else torch.float32
    img = F.normalize(image_emb.to(dtype), dim=-1)
    txt = F.normalize(text_emb.to(dtype), dim=-1)
    all_img = F.normalize(all_image_emb.to(dtype), dim=-1)
    all_txt = F.normalize(all_text_emb.to(dtype), dim=-1)
    if isinstance(logit_scale, Tensor):
        scale = logit_scale.to(img.device, dtype)
    else:
        scale = torch.tensor(float(logit_scale), dtype=dtype, device=img.device)
    logits_image = scale * img @ all_txt.T  # [b, N]
    logits_text = scale * txt @ all_img.T  # [b, N]
    if labels is None:
        target = torch.arange(offset, offset + b, device=img.device)
        return (F.cross_entropy(logits_image, target) + F.cross_entropy(logits_text, target)) / 2
    if all_labels is None or labels.shape != (b,) or all_labels.shape != (n,):
        raise ValueError(f"labels must be [b={b}] and all_labels [N={n}]; got {tuple(labels.shape)} and "
                         f"{None if all_labels is None else tuple(all_labels.shape)}")
    same = (labels.to(img.device)[:, None] == all_labels.to(img.device)[None, :]).to(dtype)  # [b, N]
    own = torch.arange(b, device=img.device)
    same[own, own + offset] = 1.0  # a pair is always its own positive
    target = same / same.sum(-1, keepdim=True)
    return (_soft_cross_entropy(logits_image, target).mean() + _soft_cross_entropy(logits_text, target).mean()) / 2


def info_nce(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, labels: Tensor | None = None) -> Tensor:
    """CLIP's symmetric InfoNCE: ``(CE(logits, arange) + CE(logits.T, arange)) / 2``.

    ``logits = logit_scale * normalise(image_emb) @ normalise(text_emb).T`` for ``[B, D]`` embeddings of B
    matching (image, text) pairs; ``logit_scale`` is the multiplier (CLIP's ``logit_scale.exp()``), not its log.
    With ``labels [B]`` (``--dedupe-labels``) pairs of the same label are positives of each other instead of
    negatives: each row's target is uniform over the columns of its label (see :func:`info_nce_local`).
    """
    return info_nce_local(image_emb, text_emb, image_emb, text_emb, logit_scale, 0, labels, labels)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces (sums) the gathered gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor, rank: int, world_size: int, group) -> Tensor:
        import torch.distributed as dist

        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor, group=group)
        parts[rank] = tensor  # the local slice is the input itself
        ctx.rank, ctx.group, ctx.rows = rank, group, tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # every backend has all_reduce (gloo too)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None, None, None


def gather_with_grad(t: Tensor, rank: int, world_size: int, group=None) -> Tensor:
    """``[b, ...]`` on each of ``world_size`` processes -> ``[world_size * b, ...]`` in rank order, differentiable.

    Every process must pass the same ``b``. With ``world_size == 1`` returns ``t`` unchanged (no process group
    needed).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if world_size == 1:
        return t
    return _GatherWithGrad.apply(t, rank, world_size, group)


def _gather_labels(labels: Tensor, world_size: int, group) -> Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return torch.cat(parts)


def distributed_info_nce(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    rank: int = 0,
    world_size: int = 1,
    labels: Tensor | None = None,
    group=None,
) -> Tensor:
    """This process's share of the global symmetric InfoNCE (see the module docstring).

    ``image_emb`` / ``text_emb [b, D]``: this process's pairs; ``labels [b]`` (``--dedupe-labels``): positives
    by label across the whole global batch. With ``world_size == 1`` this is :func:`info_nce`.
    """
    all_img = gather_with_grad(image_emb, rank, world_size, group)
    all_txt = gather_with_grad(text_emb, rank, world_size, group)
    all_labels = None
    if labels is not None:
        all_labels = labels if world_size == 1 else _gather_labels(labels, world_size, group)
    b = image_emb.shape[0]
    return info_nce_local(image_emb, text_emb, all_img, all_txt, logit_scale, rank * b, labels, all_labels)
