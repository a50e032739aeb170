"""InfoNCE over several processes: every process's embeddings are negatives for every other's (global negatives).

Each process computes the loss of its own rows against the gathered global batch
(:func:`tcompose.losses.info_nce_local`, open_clip's ``local_loss=True, gather_with_grad=True``):

    rank r:  L_r = info_nce_local(img_r, txt_r, IMG, TXT, s, offset = r * b)      IMG = [img_0; ...; img_{W-1}]

The mean of ``L_r`` over ranks equals :func:`tcompose.losses.info_nce` on the concatenated batch. The gather is
differentiable: its backward sums, over all ranks, the gradients that reach each rank's slice, so rank r's
gradient wrt ``img_r`` is ``W * dL/d img_r``; DDP's gradient averaging (``/ W``) then leaves every parameter
with exactly the gradient of the global loss. Rank and world size are passed in, never read from globals.
"""

from __future__ import annotations

import torch

from .losses import info_nce_local

Tensor = torch.Tensor


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
    by label across the whole global batch. With ``world_size == 1`` this is :func:`tcompose.losses.info_nce`.
    """
    all_img = gather_with_grad(image_emb, rank, world_size, group)
    all_txt = gather_with_grad(text_emb, rank, world_size, group)
    all_labels = None
    if labels is not None:
        all_labels = labels if world_size == 1 else _gather_labels(labels, world_size, group)
    b = image_emb.shape[0]
    return info_nce_local(image_emb, text_emb, all_img, all_txt, logit_scale, rank * b, labels, all_labels)
