"""Training logic without Ray: optimisers, schedule, the per-step loss, one epoch, state.

pipelines/train.py runs `train_epoch` inside each Ray Train worker (the model wrapped in DDP
there); tests call the same functions directly on CPU.

Recipe (DESIGN.md): loss = ce_weight * CE(label smoothing, post-BN logits)
+ triplet_weight * batch-hard triplet(pre-BN) + ctl_weight * CTL(pre-BN)
+ center_weight * center(pre-BN). Adam (lr, weight decay) for the network; the centers have
their own SGD (center_lr) and, as in the strong baseline, their gradient is divided by
center_weight before that step so the centers move at center_lr whatever the loss weight.
Learning rate per epoch: linear warm-up from lr * warmup_factor over warmup_epochs, then
x gamma at each milestone; a run held to a time budget passes its own factor instead
(model/schedule.py: the same shape in fractions of the planned run).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from model.ap_loss import ap_loss
from model.config import TrainConfig
from model.losses import CenterLoss, batch_hard_triplet, centroid_triplet, label_smoothed_ce

LOSS_PARTS = ("ce", "triplet", "ctl", "center", "ap")


def lr_factor(epoch: int, tcfg: TrainConfig) -> float:
    """Multiplier of tcfg.lr for 0-based `epoch` (warm-up then step decay)."""
    if epoch < tcfg.warmup_epochs:
        alpha = epoch / tcfg.warmup_epochs
        warm = tcfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    return warm * tcfg.gamma ** sum(1 for m in tcfg.milestones if epoch >= m)


def build_optimizers(net, center: CenterLoss | None, tcfg: TrainConfig):
    """(Adam over the network's trainable parameters, SGD over the centers or None)."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    copt = torch.optim.SGD(center.parameters(), lr=tcfg.center_lr) if center is not None else None
    return opt, copt


def set_lr(opt, epoch: int, tcfg: TrainConfig, factor: float | None = None) -> float:
    """Set and return the LR of `epoch`: tcfg.lr x `factor`, or x lr_factor(epoch) if None."""
    lr = tcfg.lr * (lr_factor(epoch, tcfg) if factor is None else factor)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def compute_losses(feat: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor,
                   center: CenterLoss | None, tcfg: TrainConfig):
    """(total loss scalar, {part: unweighted value (detached)}) for one batch.

    feat: (B, D) pre-BN feature; logits: (B, C) classifier output on the post-BN feature.
    Parts whose weight is 0 are not computed.
    """
    parts: dict[str, torch.Tensor] = {}
    total = feat.new_zeros((), dtype=torch.float32)
    if tcfg.ce_weight > 0 and logits is not None:
        parts["ce"] = label_smoothed_ce(logits, labels, tcfg.label_smoothing)
        total = total + tcfg.ce_weight * parts["ce"]
    if tcfg.triplet_weight > 0:
        parts["triplet"] = batch_hard_triplet(feat, labels, tcfg.margin)
        total = total + tcfg.triplet_weight * parts["triplet"]
    if tcfg.ctl_weight > 0:
        parts["ctl"] = centroid_triplet(feat, labels, tcfg.margin)
        total = total + tcfg.ctl_weight * parts["ctl"]
    if tcfg.center_weight > 0 and center is not None:
        parts["center"] = center(feat, labels)
        total = total + tcfg.center_weight * parts["center"]
    if tcfg.ap_weight > 0:
        parts["ap"] = ap_loss(feat, labels, tcfg.ap_bins)
        total = total + tcfg.ap_weight * parts["ap"]
    return total, {k: v.detach() for k, v in parts.items()}


def _all_reduce_mean_grads(params) -> None:
    """Average gradients over DDP ranks for parameters DDP does not own (the centers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


@dataclass
class EpochStats:
    """Per-epoch log: mean of each loss part and of the total, lr, steps, images, images/s."""

    losses: dict
    lr: float
    steps: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = {f"loss_{k}": v for k, v in self.losses.items()}
        d.update(lr=self.lr, steps=self.steps, images=self.images,
                 images_per_s=round(self.images_per_s, 2), epoch_seconds=round(self.seconds, 2))
        return d


def train_epoch(net, center: CenterLoss | None, opt, copt, batches, tcfg: TrainConfig,
                epoch: int, device: str = "cpu", scaler=None, channels_last: bool = False,
                log_every: int = 0, log=print, lr_scale: float | None = None) -> EpochStats:
    """Run one epoch over `batches` (iterable of (images (N, 3, H, W), labels (N,), ...)).

    `net` may be wrapped in DistributedDataParallel; every `tcfg.accum_steps` batches make one
    optimiser step (DDP gradient sync only on that last micro-batch). AMP is used when `scaler`
    is given (CUDA). lr_scale: this epoch's multiplier of tcfg.lr (None = the epoch schedule,
    `lr_factor`). Returns this rank's EpochStats.
    """
    import contextlib

    lr = set_lr(opt, epoch, tcfg, lr_scale)
    net.train()
    sums: dict[str, float] = defaultdict(float)
    n_batches = images = 0
    accum = tcfg.accum_steps
    use_amp = scaler is not None
    opt.zero_grad(set_to_none=True)
    if copt is not None:
        copt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    pending = False
    for micro, batch in enumerate(batches, start=1):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last_micro = micro % accum == 0
        sync = contextlib.nullcontext() if last_micro or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                feat, _, logits = net(x)
            total, parts = compute_losses(feat.float(), None if logits is None else logits.float(),
                                          y, center, tcfg)
            loss = total / accum
            (scaler.scale(loss) if use_amp else loss).backward()
        pending = True
        if last_micro:
            _step(opt, copt, center, tcfg, scaler)
            pending = False
        for k, v in parts.items():
            sums[k] += float(v)
        sums["total"] += float(total.detach())
        n_batches += 1
        images += len(y)
        if log_every and n_batches % log_every == 0:
            log(f"  epoch {epoch} step {n_batches}: loss {sums['total'] / n_batches:.4f}")
    if pending:  # a last, partial accumulation group still updates the weights
        _step(opt, copt, center, tcfg, scaler)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    losses = {k: v / max(n_batches, 1) for k, v in sums.items()}
    return EpochStats(losses=losses, lr=lr, steps=n_batches, images=images, seconds=seconds)


def _step(opt, copt, center, tcfg: TrainConfig, scaler) -> None:
    if copt is not None and center is not None and tcfg.center_weight > 0:
        _all_reduce_mean_grads(center.parameters())
        if scaler is not None:
            scaler.unscale_(copt)
        for p in center.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / tcfg.center_weight)
        if scaler is not None:
            scaler.step(copt)
        else:
            copt.step()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if copt is not None:
        copt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------- checkpoint state

def training_state(net, center, opt, copt, scaler, epoch: int, config: dict,
                   budget: dict | None = None) -> dict:
    """Everything needed to resume after `epoch` (0-based, completed). Plain tensors and
    Python values only, so it loads with torch.load(weights_only=True). `budget`: the time
    budget's bookkeeping (seconds trained so far, planned epochs), so a resumed run keeps
    counting against the same budget."""
    module = getattr(net, "module", net)
    return {
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": opt.state_dict(),
        "center": center.state_dict() if center is not None else None,
        "center_optimizer": copt.state_dict() if copt is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "config": config,
        "budget": budget,
    }


def restore_training_state(state: dict, net, center, opt, copt, scaler=None) -> int:
    """Load a `training_state` dict into live objects; returns the next epoch to run."""
    module = getattr(net, "module", net)
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if center is not None and state.get("center") is not None:
        center.load_state_dict(state["center"])
    if copt is not None and state.get("center_optimizer") is not None:
        copt.load_state_dict(state["center_optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1


def global_stats(stats: EpochStats, skipped: int, device="cpu") -> dict:
    """This rank's EpochStats -> metrics over all ranks (mean losses, total images/s).

    With torch.distributed initialised, losses and steps are averaged over ranks, images and
    `skipped` (unreadable training images) summed, and the epoch time is the slowest rank's;
    otherwise this rank's figures are the totals. Returns {"loss_<part>", "lr", "steps",
    "images", "skipped_images", "epoch_seconds", "images_per_s"}.
    """
    import torch.distributed as dist

    names = sorted(stats.losses)
    vals = torch.tensor([stats.losses[k] for k in names] + [stats.images, skipped, stats.steps],
                        dtype=torch.float64, device=device)
    secs = torch.tensor([stats.seconds], dtype=torch.float64, device=device)
    world = 1
    if dist.is_initialized():
        world = dist.get_world_size()
        dist.all_reduce(vals)
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
    vals, secs = vals.cpu().tolist(), float(secs.item())
    out = {f"loss_{k}": vals[i] / world for i, k in enumerate(names)}
    images, skipped_all, steps = vals[len(names):]
    out.update(lr=stats.lr, steps=int(steps / world), images=int(images),
               skipped_images=int(skipped_all), epoch_seconds=round(secs, 2),
               images_per_s=round(images / secs, 2) if secs > 0 else 0.0)
    return out


def format_epoch(m: dict) -> str:
    """One log line for an epoch's metrics (global_stats, plus validation scores if present)."""
    losses = " ".join(f"{k[5:]}={m[k]:.4f}" for k in sorted(m) if k.startswith("loss_"))
    line = (f"epoch {m['epoch']}: {losses} lr={m['lr']:.2e} steps={m['steps']} "
            f"images={m['images']} {m['images_per_s']:.1f} img/s ({m['epoch_seconds']:.1f}s)")
    if m.get("skipped_images"):
        line += f" skipped={m['skipped_images']}"
    if "planned_epochs" in m:
        line += (f" [budget: {m['trained_s']:.0f}/{m['time_budget_s']:.0f} s, "
                 f"{m['planned_epochs']} epochs planned]")
    if "instance_mAP" in m:
        line += (f" | instance mAP={m['instance_mAP']:.4f} R1={m['instance_rank1']:.4f}"
                 f" centroid mAP={m['centroid_mAP']:.4f} R1={m['centroid_rank1']:.4f}")
    return line
