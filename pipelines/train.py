"""Train the CTL re-identification model on WebDataset shards with Ray Train (DDP).

Reads <shards>/<split>-NNNNNN.tar (train; query and gallery for validation), trains
ReIDNet with CE + triplet + CTL + center loss on identity-balanced P x M batches (each
worker gets its own P items per step), checkpoints every epoch through ray.train.report
(model, both optimisers, center-loss state, epoch, config) and writes the final model
directory (model.pt + config.json) that embed.py loads.

Re-running with the same --name and --storage-path resumes from the last checkpoint;
a worker that dies is restarted from it (up to --max-failures times).

Configuration: --config YAML (sections model, data, train, run; see model/config.py),
then --set section.key=value overrides, then the explicit options below (highest priority).

With --time-budget (30m, 1800s, 1h) the run is sized to the wall clock instead of --epochs:
epoch 0 measures the pace, the epochs and the LR schedule (warm-up, decay points as fractions
of the run) follow it, and the run stops at the budget with a final checkpoint and model.
The model directory's training.json records the whole recipe and the budget (docs/recipe.md).

Example (CPU, 2 workers, ImageNet Lite0 start, the default recipe held to 30 minutes; Market's
128x64 images upscaled 1.5x, which the recipe study measured best for this budget):
    python pipelines/train.py --shards outputs/market/shards --backbone efficientnet_lite0 \\
        --pretrained lite0-imagenet --input-size 192 96 --time-budget 30m --num-workers 2 \\
        --name market-ctl --output outputs/models/market-ctl
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import dataclasses
import json
import os
import tempfile
import time

from cluster.errors import last_error_line
from cluster.gpus import auto_cpu_reason, probe_cuda, wait_for_gpus
from pipelines._cli import add_ray_arguments, init_ray, make_parser, run_main

STATE_FILE = "state.pt"


# (option, config key, type, help); the help's default is read from model/config.py's field
SHORTCUTS = [
    ("--shards", "data.shards", str, "folder of <split>-NNNNNN.tar shards, local or URI"),
    ("--train-split", "data.train_split", str, "split name of the training shards"),
    ("--query-split", "data.query_split", str, "split name of the validation queries"),
    ("--gallery-split", "data.gallery_split", str, "split name of the validation gallery"),
    ("--P", "data.P", int, "items per batch per worker"),
    ("--M", "data.M", int, "images per item; items with fewer use all theirs"),
    ("--loader-threads", "data.loader_threads", int, "decode/augment threads per worker"),
    ("--crop-pad", "data.crop_pad", int, "train crop: pad by N pixels, random crop back"),
    ("--erase-prob", "data.erase_prob", float, "train random-erasing probability; 0 = off"),
    ("--backbone", "model.backbone", str,
     "resnet18 | resnet34 | resnet50 | resnet50_ibn_a | efficientnet_lite0"),
    ("--pooling", "model.pooling", str, "avg | max | gem | rmac"),
    ("--neck-feat", "model.neck_feat", str, "inference embedding: after | before the BN-neck"),
    ("--gem-p", "model.gem_p", float, "GeM: starting exponent p, learned from there"),
    ("--flip-test", "model.flip_test", str,
     "test-time flip: embed as the mean of the image and its mirror: true | false"),
    ("--last-stride", "model.last_stride", int, "stride of the last backbone stage, 1 or 2"),
    ("--pretrained", "train.pretrained", str,
     "start weights: lite0-imagenet, a state-dict file or a model directory"),
    ("--epochs", "train.epochs", int, "epochs"),
    ("--steps-per-epoch", "train.steps_per_epoch", int,
     "steps per epoch; 0 = one pass over all training items"),
    ("--lr", "train.lr", float, "Adam learning rate"),
    ("--warmup-epochs", "train.warmup_epochs", int, "linear warm-up epochs"),
    ("--schedule", "train.schedule", str,
     "with --time-budget: step (x0.1 at --milestone-fracs) | cosine"),
    ("--warmup-frac", "train.warmup_frac", float,
     "with --time-budget: linear warm-up over this fraction of the run"),
    ("--center-lr", "train.center_lr", float, "SGD learning rate of the centers"),
    ("--ctl-weight", "train.ctl_weight", float, "CTL weight; 0 switches CTL off"),
    ("--ap-weight", "train.ap_weight", float, "listwise AP loss weight; 0 = off"),
    ("--triplet-weight", "train.triplet_weight", float, "batch-hard triplet weight"),
    ("--center-weight", "train.center_weight", float, "center loss weight; 0 = off"),
    ("--accum-steps", "train.accum_steps", int, "batches per optimiser step"),
    ("--margin", "train.margin", float, "triplet and CTL margin"),
    ("--amp", "train.amp", str, "mixed precision (fp16 autocast) on GPU: true | false"),
    ("--channels-last", "train.channels_last", str,
     "NHWC memory layout, GPU and CPU: true | false"),
    ("--eval-batch-size", "train.eval_batch_size", int, "validation embedding batch"),
    ("--seed", "train.seed", int, "random seed"),
    ("--eval-every", "train.eval_every", int,
     "validate every N epochs; 0 = after the last epoch only; -1 = never"),
    ("--name", "run.name", str, "run name; same name + storage path = resume"),
    ("--storage-path", "run.storage_path", str,
     "where Ray Train keeps checkpoints, local or URI"),
    ("--output", "run.output", str, "final model directory"),
    ("--num-workers", "run.num_workers", int, "training workers (DDP ranks)"),
    ("--use-gpu", "run.use_gpu", str,
     "auto | true | false; auto = GPU if the cluster has one now; true waits for GPU nodes"),
    ("--gpu-wait", "run.gpu_wait_s", float, "--use-gpu true: seconds to wait for GPU nodes to join"),
    ("--cpus-per-worker", "run.cpus_per_worker", int, "CPUs reserved per worker"),
    ("--max-failures", "run.max_failures", int, "worker-group restarts from the last checkpoint"),
]


# how the help shows an empty default
EMPTY_DEFAULTS = {"data.shards": "none", "train.pretrained": "none",
                  "run.output": "<storage-path>/<name>/model"}


def default_text(key: str) -> str:
    """'section.field' -> its model/config.py default as the help shows it."""
    from model import config

    section, name = key.split(".")
    cls = {f.name: f.type for f in dataclasses.fields(config.Config)}[section]
    value = config.field_default(getattr(config, cls) if isinstance(cls, str) else cls, name)
    if value == "" and key in EMPTY_DEFAULTS:
        return EMPTY_DEFAULTS[key]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--config", default=None, help="YAML file with sections model/data/train/run")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.margin=0.3 (repeatable)")
    # default=None everywhere: an option given on the command line overrides YAML and --set,
    # one not given leaves them alone; the help shows the dataclass default
    p.add_argument("--input-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help=f"network input height and width ({default_text('model.input_size')})")
    p.add_argument("--milestones", nargs="+", type=int, default=None, metavar="EPOCH",
                   help="epochs where the learning rate is multiplied by "
                        f"{default_text('train.gamma')} ({default_text('train.milestones')})")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="train for this wall-clock time (30m, 1800s, 1h): epoch 0 measures the "
                        "pace, the epochs and the LR schedule (warm-up, decay) are sized to the "
                        "budget as fractions of the run; replaces --epochs/--milestones")
    p.add_argument("--milestone-fracs", nargs="+", type=float, default=None, metavar="FRAC",
                   help="with --time-budget and --schedule step: fractions of the run where the "
                        f"learning rate is multiplied by {default_text('train.gamma')} "
                        f"({default_text('train.milestone_fracs')})")
    p.add_argument("--no-ctl", action="store_true", help="switch CTL off (same as --ctl-weight 0)")
    for opt, key, tp, help_text in SHORTCUTS:
        p.add_argument(opt, dest=key.replace(".", "__"), type=tp, default=None,
                       help=f"{help_text} ({default_text(key)}) [{key}]")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON and exit")
    add_ray_arguments(p)
    return p


def resolve_config(args):
    """Parsed arguments -> validated Config (YAML < --set < explicit options)."""
    from model.config import load_config

    overrides = list(args.set)
    for _, key, _, _ in SHORTCUTS:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}" if isinstance(value, str) and value == ""
                             else f"{key}={value}")
    if args.input_size:
        overrides.append(f"model.input_size=[{args.input_size[0]}, {args.input_size[1]}]")
    if args.milestones:
        overrides.append(f"train.milestones={list(args.milestones)}")
    if args.no_ctl:
        overrides.append("train.ctl_weight=0")
    if args.milestone_fracs:
        overrides.append(f"train.milestone_fracs={list(args.milestone_fracs)}")
    if args.time_budget is not None:
        from model.schedule import parse_duration

        if args.train__epochs is not None or args.milestones:
            raise ValueError("--time-budget sizes the run itself: give it or --epochs/--milestones")
        overrides.append(f"train.time_budget_s={parse_duration(args.time_budget)}")
    return load_config(args.config, overrides)


# ------------------------------------------------------------------------------ the worker

def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build, maybe resume, then train/validate/checkpoint each epoch."""
    import dataclasses

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from model.checkpoint import build_model, load_pretrained
    from model.config import Config, from_dict
    from model.data import BatchLoader
    from model.losses import CenterLoss
    from model.sampler import ShardReader, iter_plan_rows, plan_epoch
    from model.schedule import BudgetPlan, budget_lr_factor, format_duration
    from model.training import (
        build_optimizers,
        format_epoch,
        global_stats,
        restore_training_state,
        train_epoch,
        training_state,
    )
    from model.transforms import train_transform

    cfg = from_dict(Config, config["cfg"])
    mcfg, dcfg, tcfg = cfg.model, cfg.data, cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    torch.manual_seed(tcfg.seed)  # same initial network and centers on every rank
    net = build_model(mcfg)
    center = CenterLoss(mcfg.num_classes, mcfg.embedding_dim) if tcfg.center_weight > 0 else None
    checkpoint = ray.train.get_checkpoint()
    if tcfg.pretrained and checkpoint is None:
        report = load_pretrained(net, tcfg.pretrained)
        log(report.summary())
    net.to(device)
    if center is not None:
        center.to(device)
    if tcfg.channels_last:  # GPU, and CPU too: oneDNN depthwise convs run ~1.5x faster in NHWC
        net.to(memory_format=torch.channels_last)
    opt, copt = build_optimizers(net, center, tcfg)
    scaler = torch.amp.GradScaler("cuda") if on_gpu and tcfg.amp else None
    start, state = 0, {}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
        start = restore_training_state(state, net, center, opt, copt, scaler)
        log(f"resumed from checkpoint after epoch {start - 1}")
    net = ray.train.torch.prepare_model(
        net, parallel_strategy_kwargs={"find_unused_parameters": tcfg.ce_weight <= 0})

    train_index, items = config["train_index"], config["items"]
    reader = ShardReader(train_index)
    tf = train_transform(mcfg, pad=dcfg.crop_pad, erase_p=dcfg.erase_prob)
    plan = None
    if tcfg.time_budget_s > 0:
        saved = state.get("budget") if checkpoint is not None else None
        plan = BudgetPlan.from_dict(saved) if saved else BudgetPlan(tcfg.time_budget_s)
        if plan.budget_s != tcfg.time_budget_s:  # resumed with a new budget: extend/shorten
            plan.rebudget(tcfg.time_budget_s)
        if checkpoint is None:
            log(f"time budget {format_duration(tcfg.time_budget_s)}: epoch 0 measures the pace, "
                "the epochs and the LR schedule follow it")
    epoch, overhead = start, 0.0
    while (plan.more() if plan is not None else epoch < tcfg.epochs):
        t_epoch = time.perf_counter()
        _maybe_fail(config, epoch, rank, world)
        torch.manual_seed(tcfg.seed * 100003 + epoch * 101 + rank)  # augmentation stream
        epoch_plan = plan_epoch(items, dcfg.P, dcfg.M, world, rank, tcfg.seed, epoch,
                                tcfg.steps_per_epoch)
        loader = BatchLoader(train_index, iter_plan_rows(epoch_plan), tf,
                             threads=dcfg.loader_threads, max_pixels=dcfg.max_pixels, reader=reader)
        lr_scale = None if plan is None else budget_lr_factor(
            epoch, plan.total_epochs, tcfg.schedule, tcfg.warmup_frac, tcfg.warmup_factor,
            tcfg.milestone_fracs, tcfg.gamma)
        stats = train_epoch(net, center, opt, copt, loader, tcfg, epoch, device=str(device),
                            scaler=scaler, channels_last=tcfg.channels_last, lr_scale=lr_scale)
        if stats.images == 0:
            reason = loader.skipped[0] if loader.skipped else "no batches"
            raise RuntimeError(f"epoch {epoch}: no training image could be read ({reason})")
        metrics = global_stats(stats, len(loader.skipped), device)
        metrics["epoch"] = epoch
        metrics["resumed_at"] = start
        if plan is None:
            last = epoch == tcfg.epochs - 1
        else:
            # the slowest rank's wall time (+ the previous checkpoint's) decides, so every
            # rank makes the same plan; validation time is not charged to the budget
            plan.record(_agree_max(time.perf_counter() - t_epoch + overhead, device))
            last = not plan.more()
            metrics.update(planned_epochs=plan.total_epochs, trained_s=round(plan.trained_s, 2),
                           time_budget_s=plan.budget_s)
        if config["eval"] and (last or (tcfg.eval_every > 0 and (epoch + 1) % tcfg.eval_every == 0)):
            metrics.update(_validate(net, config, cfg, rank, world, device, on_gpu))
        log(format_epoch(metrics))
        t_ckpt = time.perf_counter()
        if rank == 0 and config.get("history"):
            os.makedirs(os.path.dirname(config["history"]), exist_ok=True)
            with open(config["history"], "a") as f:
                f.write(json.dumps(metrics, sort_keys=True) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = training_state(net, center, opt, copt, scaler, epoch,
                                       dataclasses.asdict(cfg),
                                       plan.as_dict() if plan is not None else None)
                torch.save(state, os.path.join(tmp, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        overhead = time.perf_counter() - t_ckpt
        epoch += 1
    reader.close()
    if dist.is_initialized():
        dist.barrier()


def _maybe_fail(config: dict, epoch: int, rank: int, world: int) -> None:
    """Fault-injection hook for tests and drills: with CR_TRAIN_FAIL_AT_EPOCH=N set for the
    job, the last rank kills its own process at the start of epoch N, once per run (a marker
    file in the run's storage folder remembers it), so the restarted group must resume from
    the checkpoint of epoch N-1."""
    if config.get("fail_at_epoch") != epoch or rank != world - 1:
        return
    marker = config["fail_marker"]
    if os.path.exists(marker):
        return
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} at the start of epoch {epoch}\n")
    print(f"fault injection: rank {rank} exits at the start of epoch {epoch}", flush=True)
    time.sleep(2.0)  # let the controller register the previous epoch's checkpoint first
    os._exit(1)


def _agree_max(value: float, device) -> float:
    """The largest `value` over all ranks (the value itself without a process group)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _validate(net, config, cfg, rank, world, device, on_gpu) -> dict:
    """Embed query + gallery (rows split over ranks), gather on all ranks, score on rank 0."""
    import numpy as np
    import torch.distributed as dist

    from model.data import embed_rows
    from model.transforms import eval_transform
    from pipelines._validation import reid_metrics

    t0 = time.perf_counter()
    tf = eval_transform(cfg.model)
    parts = {}
    for side in ("query", "gallery"):
        idx = config[f"{side}_index"]
        rows = np.arange(rank, len(idx), world)
        parts[side] = embed_rows(net, idx, rows, tf, batch_size=cfg.train.eval_batch_size,
                                 device=str(device), threads=cfg.data.loader_threads,
                                 max_pixels=cfg.data.max_pixels,
                                 channels_last=cfg.train.channels_last,
                                 amp=on_gpu and cfg.train.amp)
    if dist.is_initialized() and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, parts)
    else:
        gathered = [parts]
    if rank != 0:
        return {}
    out = {}
    merged = {}
    for side in ("query", "gallery"):
        rows = np.concatenate([g[side][0] for g in gathered])
        emb = np.concatenate([g[side][1] for g in gathered])
        order = np.argsort(rows, kind="stable")
        merged[side] = (rows[order], emb[order])
    out.update(reid_metrics(config["query_index"], config["gallery_index"], merged))
    out["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return out


# ------------------------------------------------------------------------------ the driver

def check_pretrained(spec: str) -> None:
    from model.checkpoint import resolve_pretrained

    if spec:
        path = resolve_pretrained(spec)
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weights not found: {spec}")


def main(argv=None) -> int:
    import dataclasses

    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    out = run_training(cfg, args.address, args.num_cpus)
    print(f"done in {out['seconds']:.0f}s; model {out['model_id']} written to {out['output']}")
    print(json.dumps(out["metrics"], indent=2, sort_keys=True, default=str))
    return 0


def run_training(cfg, address: str | None = None, num_cpus: int | None = None) -> dict:
    """Index the shards, run the TorchTrainer, export the final model.

    Returns {"metrics": last epoch's metrics, "model_id", "output", "seconds"}. Per-epoch
    metrics are also appended to <storage>/<name>/epochs.jsonl (local storage).
    """
    import dataclasses

    from model.train_data import prepare_data

    check_pretrained(cfg.train.pretrained)
    data = prepare_data(cfg)
    cfg.model.num_classes = len(data["items"])
    storage = cfg.run.storage_path
    if "://" not in storage:
        storage = os.path.abspath(storage)
    output = cfg.run.output or os.path.join(storage, cfg.run.name, "model")

    init_ray(address, num_cpus, worker_output=True)
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    use_gpu = {"true": True, "false": False}.get(cfg.run.use_gpu)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        if not use_gpu:
            print(auto_cpu_reason("train", "--use-gpu"), flush=True)
    if use_gpu:  # ask the autoscaler for one GPU per worker, wait, then check CUDA on one
        wait_for_gpus(ray, cfg.run.gpu_wait_s, need=cfg.run.num_workers, job="train")
        probe_cuda(ray, job="train")
    print(f"training {cfg.model.backbone} on {cfg.run.num_workers} worker(s), "
          f"{'GPU' if use_gpu else 'CPU'}, {cfg.model.num_classes} classes", flush=True)
    run_dir = os.path.join(storage, cfg.run.name)
    loop_config = {"cfg": dataclasses.asdict(cfg), **data,
                   "fail_at_epoch": _env_int("CR_TRAIN_FAIL_AT_EPOCH"),
                   "fail_marker": os.path.join(run_dir, "fault-injected"),
                   "history": None if "://" in run_dir else os.path.join(run_dir, "epochs.jsonl")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # the workers' first error line, not Ray's report
        raise RuntimeError(f"training failed: {worker_error_line(e)}") from e
    if result.checkpoint is None:
        raise RuntimeError("training produced no checkpoint")
    model_id = export_model(result.checkpoint, cfg, output)
    final = {k: v for k, v in (result.metrics or {}).items() if not isinstance(v, dict)}
    return {"metrics": final, "model_id": model_id, "output": output,
            "seconds": time.perf_counter() - t0}


def worker_error_line(e: BaseException) -> str:
    """One line for a failed Ray Train run: the innermost error of the first worker's failure
    (Ray's report repeats tracebacks), else of the report itself."""
    failures = getattr(e, "worker_failures", None) or {}
    return last_error_line(str(next(iter(failures.values()))) if failures else str(e))


def export_model(checkpoint, cfg, output: str) -> str:
    """The last checkpoint's network -> final model directory (save_model); returns its id.

    Beside model.pt and config.json the directory gets training.json: the whole resolved
    recipe (every config section), the time budget and how the run ended."""
    import dataclasses

    import torch

    from model.checkpoint import TRAINING_FILE, build_model, save_model

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    net = build_model(cfg.model)
    net.load_state_dict(state["model"])
    budget = state.get("budget")
    record = {"config": dataclasses.asdict(cfg), "epochs_trained": int(state["epoch"]) + 1,
              "time_budget_s": cfg.train.time_budget_s or None,
              "trained_s": round(budget["trained_s"], 2) if budget else None}
    return save_model(net, cfg.model, output,
                      {TRAINING_FILE: json.dumps(record, indent=2, sort_keys=True).encode()})


def _env_int(name: str):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


if __name__ == "__main__":
    run_main(main)
