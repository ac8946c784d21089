"""The budgeted recipe study on Market-1501-mini: every lever against the default recipe.

    python benchmarks/recipe.py --budget 30m                          # every lever, seed 0
    python benchmarks/recipe.py --budget 30m --only default,no-ctl --seeds 0,1,2   # final comparison
    python benchmarks/recipe.py --print-only                          # the markdown table

Every run is the real jobs as subprocesses, on the same footing: pipelines/train.py with the
fixed base (EfficientNet-Lite0 from its local ImageNet weights, input 192x96 for Market's
128x64 images, Ray Train with 2 workers, no validation during training), the default recipe (train.py's own defaults) plus
the lever's flags, and `--time-budget` (the same wall clock for every run); then
pipelines/embed.py embeds query and gallery with the model's own config (test-time flip when
it says so) and pipelines/evaluate.py scores them in instance and centroid mode, without
re-ranking. The test-time levers (flip-off, neck-before: how a model embeds, not how it
trains) re-embed the default run's model of the same seed with that one config.json field
changed; their rows carry the default's train command, `model_from` and `config_override`.
One JSON line per (run, seed, budget) goes to --results; a run already there is
skipped, and a model or embedding already in --work is reused, so an interrupted study picks
up where it stopped. `--print-only` renders mean and spread (sample standard deviation) over
seeds per run, each against the default. The shards are made once (make_shards.py) and cached.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "market1501_mini" / "Market-1501-v15.09.15"
RESULTS = REPO / "benchmarks" / "results" / "recipe.jsonl"

# What every run shares: the network, its start, its input and the machine's workers. The input
# was 128x64 (the images' own size) until the study measured 192x96 better (lever "in128" now).
BASE = ["--backbone", "efficientnet_lite0", "--pretrained", "lite0-imagenet",
        "--input-size", "192", "96", "--num-workers", "2", "--eval-every", "-1"]

# (name, train.py flags on top of the default recipe, what it changes). "default" is the
# recipe of train.py with no recipe flags; every other run changes one thing. Rows named
# "LEVER@BASE" in the results were measured on another base recipe (one the study replaced:
# "in128", "p16m4@in128") and are compared with that base's run.
LEVERS = [
    ("default", [], "train.py defaults at 192x96: R-MAC, flip test, P8 x M8, Adam 7e-4, step 0.1/0.7/0.9"),
    ("no-ctl", ["--no-ctl"], "CTL off (the final comparison, over seeds)"),
    ("pool-avg", ["--pooling", "avg"], "global average pooling (the old default)"),
    ("pool-gem", ["--pooling", "gem"], "GeM, p learned from 3"),
    ("flip-off", ["--flip-test", "false"], "no test-time flip (the default's models, re-embedded)"),
    ("p8m4", ["--P", "8", "--M", "4"], "8 items x 4 images per worker step"),
    ("p32m4", ["--P", "32", "--M", "4"], "32 items x 4 images"),
    ("p16m4", ["--P", "16", "--M", "4"], "16 items x 4 images (DESIGN's, the default until the study)"),
    ("steps20", ["--steps-per-epoch", "20"], "20 steps per epoch (fewer checkpoints)"),
    ("cosine", ["--schedule", "cosine"], "cosine decay after the warm-up"),
    ("warmup0", ["--warmup-frac", "0"], "no warm-up"),
    ("warmup0.2", ["--warmup-frac", "0.2"], "warm-up over 20% of the run"),
    ("decay0.5-0.8", ["--milestone-fracs", "0.5", "0.8"], "x0.1 at 50% and 80%"),
    ("lr3.5e-4", ["--lr", "3.5e-4"], "half the learning rate (DESIGN's, the default until 12-07)"),
    ("erase0", ["--erase-prob", "0"], "no random erasing"),
    ("erase0.25", ["--erase-prob", "0.25"], "random erasing p=0.25"),
    ("pad0", ["--crop-pad", "0"], "no pad + random crop"),
    ("pad5", ["--crop-pad", "5"], "pad 5 + random crop"),
    ("ctl0.5", ["--ctl-weight", "0.5"], "CTL weight 0.5"),
    ("ctl2", ["--ctl-weight", "2"], "CTL weight 2"),
    ("center0", ["--center-weight", "0"], "center loss off"),
    ("center2e-3", ["--center-weight", "2e-3"], "center weight 2e-3"),
    ("ap1", ["--ap-weight", "1"], "listwise AP loss, weight 1"),
    ("neck-before", ["--neck-feat", "before"], "BN-neck: embed the pre-BN feature (the default's models, re-embedded)"),
    ("center-lr0.1", ["--center-lr", "0.1"], "the centers' SGD at lr 0.1"),
    ("nchw", ["--channels-last", "false"], "NCHW memory layout"),
    ("loader1", ["--loader-threads", "1"], "1 decode/augment thread per worker"),
    ("loader4", ["--loader-threads", "4"], "4 decode/augment threads per worker"),
    # Market-1501's images are 128x64; the strong baseline (and ModelConfig's default) upscales
    # them to 256x128: a finer final map for the pooling, at ~4x the compute per image
    ("in128", ["--input-size", "128", "64"], "input 128x64, the images' own size (the base until 12-07)"),
    ("in256", ["--input-size", "256", "128"], "input 256x128 (upscaled 2x, ModelConfig's default)"),
]
LEVER_NAMES = [n for n, _, _ in LEVERS]
# Levers whose change became the default: their old rows still need a description
RETIRED = {"lr7e-4": "twice the learning rate (7e-4, the default since 12-07)"}

# Levers that change only how a trained model embeds (its config.json, never its weights or its
# training) are measured on the default recipe's own models, seed for seed: the difference is
# the lever's alone, with no training noise, and it costs an embed instead of a training run.
TEST_LEVERS = {"flip-off": {"flip_test": False}, "neck-before": {"neck_feat": "before"}}
METRICS = ("instance_mAP", "instance_rank1", "centroid_mAP", "centroid_rank1")


def rel(x) -> str:
    return str(x).replace(str(REPO) + "/", "")


def command_text(args: list) -> str:
    return "python " + shlex.join(rel(a) for a in args)


def run(args: list, log: pathlib.Path) -> None:
    """Run one job (a script path + arguments) with this Python, output appended to `log`."""
    print("$ " + command_text(args), flush=True)
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                           cwd=REPO, check=False)
    if r.returncode:
        lines = log.read_text().strip().splitlines() or [""]
        why = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1])
        raise SystemExit(f"failed (exit {r.returncode}): {why[:300]}; log {log}")


def ensure_shards(shards: pathlib.Path, data: pathlib.Path, log: pathlib.Path) -> pathlib.Path:
    """make_shards once (market1501 layout); returns the folder of <split>-NNNNNN.tar."""
    if not (shards / "shards").is_dir():
        if not data.is_dir():
            raise SystemExit(f"Market-1501-mini not found at {data} (see ../shared/data/README.md)")
        run([REPO / "pipelines" / "make_shards.py", "--format", "market1501", "--root", data,
             "--out", shards], log)
    return shards / "shards"


def read_results(path: pathlib.Path) -> list[dict]:
    """Rows of the JSONL; a line that is not JSON is reported and left out, never fatal."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {rel(path)} line {n} is not JSON; left out", file=sys.stderr)
    return rows


def append_result(path: pathlib.Path, row: dict) -> None:
    """Add one line; the file is rewritten under a temporary name and renamed, so a crash
    never leaves half a line or loses earlier runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(old + json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)


def default_model(a, seed: int) -> tuple[pathlib.Path, str]:
    """The default recipe's model dir and train command for this seed and budget (from the
    results, so a default run made under another tag is found too)."""
    for r in read_results(a.results):
        if r["name"] == "default" and r["seed"] == seed and r["budget_s"] == a.budget_s:
            argv = shlex.split(r["command"])
            return REPO / argv[argv.index("--output") + 1], r["command"]
    raise SystemExit(f"run 'default' seed {seed} at this budget first: the test-time levers "
                     f"({', '.join(TEST_LEVERS)}) re-embed its model")


FROM_DATA = {"model.num_classes"}  # train.py sets it from the shards, not from the recipe


def stale_fields(train_argv: list, model: pathlib.Path) -> list[str]:
    """The recipe fields ("train.lr", ...) in which the model already in `model` (its
    training.json) differs from what `train_argv` (train.py and its arguments) resolves to under
    today's defaults. A default that changed since the model was trained leaves the command the
    same, so only the resolved recipe tells a stale model from a finished run. Fields the
    record predates are not compared."""
    from pipelines.train import build_parser, resolve_config

    args = build_parser().parse_args([str(x) for x in train_argv[1:]])
    now = json.loads(json.dumps(dataclasses.asdict(resolve_config(args))))  # tuples as JSON lists
    then = json.loads((model / "training.json").read_text())["config"]
    return [f"{sec}.{k}" for sec in ("model", "data", "train") for k, v in now[sec].items()
            if k in then.get(sec, {}) and then[sec][k] != v and f"{sec}.{k}" not in FROM_DATA]


def derive_model(src: pathlib.Path, dst: pathlib.Path, override: dict) -> None:
    """dst = src's weights and training record with config.json changed by `override`
    (written under a temporary name, renamed when complete)."""
    cfg = json.loads((src / "config.json").read_text())
    unknown = set(override) - set(cfg)
    if unknown:
        raise SystemExit(f"{src}/config.json has no {min(unknown)!r} to override")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("model.pt", "training.json"):
        shutil.copy2(src / f, tmp / f)
    (tmp / "config.json").write_text(json.dumps({**cfg, **override}, indent=2, sort_keys=True))
    os.replace(tmp, dst)


def one_run(a, shards: pathlib.Path, name: str, flags: list, seed: int) -> dict:
    """Train (held to the budget; a test-time lever reuses the default's model), embed,
    evaluate; returns the JSONL row."""
    tag = f"{name}-b{int(a.budget_s)}-s{seed}"
    work = a.work / tag
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    model, emb, report = work / "model", work / "emb", work / "eval.json"
    train = [REPO / "pipelines" / "train.py", "--shards", shards, *BASE, *flags,
             "--time-budget", f"{a.budget_s:g}s", "--seed", seed, "--name", tag,
             "--storage-path", a.work / "ray_results", "--output", model]
    derived = {}
    if name in TEST_LEVERS:
        src, train_command = default_model(a, seed)
        if not (model / "model.pt").exists():
            derive_model(src, model, TEST_LEVERS[name])
        derived = {"command": train_command, "model_from": f"default seed {seed}: {rel(src)}",
                   "config_override": TEST_LEVERS[name]}
    embed = [REPO / "pipelines" / "embed.py", "--model", model, "--shards", shards, "--out", emb]
    evaluate = [REPO / "pipelines" / "evaluate.py", "--query", emb, "--query-split", "query",
                "--gallery", emb, "--gallery-split", "gallery", "--mode", "both",
                "--rerank", "none", "--out", report]
    if (model / "model.pt").exists() and not derived:
        stale = stale_fields(train, model)
        if stale:
            raise SystemExit(f"{rel(model)} was trained with another recipe ({', '.join(stale)} "
                             f"differ from today's defaults): move it away or give another --work")
    t0 = time.perf_counter()
    if not (model / "model.pt").exists():
        run(train, log)
    wall_s = time.perf_counter() - t0
    if not emb.exists():
        run(embed, log)
    if not report.exists():
        run(evaluate, log)
    training = json.loads((model / "training.json").read_text())
    mcfg = json.loads((model / "config.json").read_text())
    reports = {r["mode"]: r for r in json.loads(report.read_text())}
    tcfg = training["config"]["train"]
    row = {"name": name, "default": name == "default", "seed": seed,
           "ctl": tcfg["ctl_weight"] > 0, "budget_s": a.budget_s,
           "train_s": training["trained_s"], "epochs": training["epochs_trained"],
           "flags": flags, "pooling": mcfg["pooling"], "flip_test": mcfg["flip_test"],
           "command": command_text(train), "embed_command": command_text(embed),
           "evaluate_command": command_text(evaluate), **derived}
    if wall_s > 1 and not derived:  # trained now (not a model reused from --work)
        row["train_wall_s"] = round(wall_s, 1)
    for mode in ("instance", "centroid"):
        r = reports[mode]
        row.update({f"{mode}_mAP": round(r["mAP"], 4), f"{mode}_rank1": round(r["cmc"]["1"], 4),
                    f"{mode}_rank5": round(r["cmc"]["5"], 4), f"{mode}_mINP": round(r["mINP"], 4)})
    return row


def summarize(rows: list[dict], budget_s: float | None = None) -> list[dict]:
    """Per (name, budget): n seeds, mean and spread (sample std; 0 for one seed) per metric."""
    groups: dict = {}
    for r in rows:
        if budget_s is None or r["budget_s"] == budget_s:
            groups.setdefault((r["name"], r["budget_s"]), []).append(r)
    out = []
    for (name, budget), rs in groups.items():
        s = {"name": name, "budget_s": budget, "seeds": sorted(r["seed"] for r in rs),
             "train_s": statistics.fmean(r["train_s"] for r in rs),
             # the machine's speed varies between sessions: epochs show what a budget bought
             "epochs": statistics.fmean(r.get("epochs", 0) for r in rs)}
        for m in METRICS:
            vals = [r[m] for r in rs]
            s[m] = statistics.fmean(vals)
            s[m + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    order = {n: i for i, n in enumerate(LEVER_NAMES)}
    def key(s):  # LEVER@BASE rows after the default recipe's, each lever in LEVERS order
        lever, at, _ = s["name"].partition("@")
        return s["budget_s"], bool(at), order.get(lever, len(order)), s["name"]

    return sorted(out, key=key)


def render_table(summary: list[dict]) -> str:
    """Markdown: mean ± spread over seeds; Δ = instance mAP minus the default's (a LEVER@BASE
    row: minus BASE's), same budget."""
    base = {s["budget_s"]: s for s in summary if s["name"] == "default"}
    what = {n: d for n, _, d in LEVERS} | RETIRED
    header = ("| run | change | budget | seeds | inst. mAP | inst. R1 | centroid mAP | centroid R1 "
              "| Δ inst. mAP | train s | epochs |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(s, m):
        return f"{s[m]:.3f}" + (f" ± {s[m + '_sd']:.3f}" if len(s["seeds"]) > 1 else "")

    by_name = {(s["name"], s["budget_s"]): s for s in summary}
    for s in summary:
        lever, _, on = s["name"].partition("@")
        ref = by_name.get((on, s["budget_s"])) if on else base.get(s["budget_s"])
        change = what.get(lever, "") + (f" (on {on})" if on else "")
        delta = f"{s['instance_mAP'] - ref['instance_mAP']:+.3f}" if ref and s is not ref else ""
        seeds = ",".join(map(str, s["seeds"]))
        lines.append(f"| {s['name']} | {change} | {s['budget_s']:g} s | {seeds} | "
                     + " | ".join(cell(s, m) for m in METRICS) + f" | {delta} | {s['train_s']:.0f} | {s['epochs']:.0f} |")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    return seeds


def main() -> None:
    from model.schedule import format_duration, parse_duration

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="30m", help="training wall clock per run (default 30m)")
    p.add_argument("--seeds", default="0", help="seeds, comma-separated (default 0)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]",
                   help=f"run only these (default: all). Runs: {', '.join(LEVER_NAMES)}")
    p.add_argument("--results", type=pathlib.Path, default=RESULTS,
                   help=f"JSONL of runs, appended to (default {rel(RESULTS)})")
    p.add_argument("--work", type=pathlib.Path, default=REPO / "outputs" / "recipe",
                   help="models, embeddings and logs per run (default outputs/recipe)")
    p.add_argument("--shards", type=pathlib.Path, default=REPO / "outputs" / "market_mini",
                   help="make_shards output (made from --data when missing)")
    p.add_argument("--data", type=pathlib.Path, default=DATA, help="Market-1501-mini root")
    p.add_argument("--print-only", action="store_true",
                   help="render the table from --results and stop (all budgets, or --budget if given)")
    a = p.parse_args()
    try:
        a.budget_s = parse_duration(a.budget)
    except ValueError as e:
        raise SystemExit(f"--budget: {e}") from None
    if a.print_only:
        rows = read_results(a.results)
        if not rows:
            raise SystemExit(f"no runs in {rel(a.results)}")
        given = any(x == "--budget" or x.startswith("--budget=") for x in sys.argv[1:])
        summary = summarize(rows, a.budget_s if given else None)
        if not summary:
            raise SystemExit(f"no runs of {format_duration(a.budget_s)} in {rel(a.results)}")
        print(render_table(summary))
        return
    names = LEVER_NAMES if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEVER_NAMES]
    if unknown or not names:
        raise SystemExit(f"--only: unknown run {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(LEVER_NAMES)}")
    seeds = parse_seeds(a.seeds)
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(a.shards.resolve(), a.data.resolve(), a.work / "make_shards.log")
    flags = {n: f for n, f, _ in LEVERS}
    done = {(r["name"], r["seed"], r["budget_s"]) for r in read_results(a.results)}
    todo = [(n, s) for s in seeds for n in names if (n, s, a.budget_s) not in done]
    print(f"{len(todo)} run(s) of {format_duration(a.budget_s)} to do "
          f"({len(names) * len(seeds) - len(todo)} already in {rel(a.results)})", flush=True)
    for i, (name, seed) in enumerate(todo, 1):
        print(f"\n== [{i}/{len(todo)}] {name}, seed {seed}", flush=True)
        row = one_run(a, shards, name, flags[name], seed)
        append_result(a.results, row)
        print(f"   instance mAP {row['instance_mAP']:.3f} R1 {row['instance_rank1']:.3f} | "
              f"centroid mAP {row['centroid_mAP']:.3f} R1 {row['centroid_rank1']:.3f} | "
              f"{row['epochs']} epochs, {row['train_s']:.0f} s", flush=True)
    rows = [r for r in read_results(a.results) if r["name"] in names]
    if rows:
        print("\n" + render_table(summarize(rows, a.budget_s)))


if __name__ == "__main__":
    main()
