"""Contrastive pretraining of the tiny CLIP on the procedural world (clean domain).

Reproducible from its seed. Writes the open_clip state dict as fp16 safetensors and a JSON log
(training curve, zero-shot and linear-probe accuracies per task and domain, wall time).

    python3 experiments/pretrain_world.py                  # the shipped run
    python3 experiments/pretrain_world.py --steps 300 --out /tmp/pilot   # a pilot
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from adapt.data.world import vocab  # noqa: E402
from adapt.data.world.captions import caption  # noqa: E402
from adapt.data.world.render import render  # noqa: E402
from adapt.data.world.scenes import sample_scene  # noqa: E402
from adapt.data.world.tasks import TASKS, WorldTask  # noqa: E402

MODEL_CONFIGS = ROOT / "adapt" / "model_configs"
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

# (attributes, domain) pairs evaluated during and after training
EVAL_SETS = [
    (("colour",), "clean"), (("colour",), "dusk"), (("colour",), "noisy"),
    (("colour",), "clutter"), (("colour",), "sketch"),
    (("fill",), "clean"), (("fill",), "dusk"), (("fill",), "noisy"), (("fill",), "clutter"),
    (("shape",), "clean"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-vit-p4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--fill-groups", type=float, default=0.4,
                   help="share of each batch made of groups that differ only in fill")
    p.add_argument("--shape-groups", type=float, default=0.0,
                   help="share of each batch made of groups that differ only in shape")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-per-class", type=int, default=30,
                   help="probe-train and test images per class (half each) for the checks")
    p.add_argument("--out", default=None,
                   help="output prefix; default: adapt/weights/<model>-world.safetensors and "
                        "experiments/results/pretrain_world.json")
    p.add_argument("--max-minutes", type=float, default=50.0,
                   help="stop early (and still save) if training would run past this")
    p.add_argument("--eval-only", action="store_true",
                   help="skip training: evaluate the saved checkpoint on the registered world "
                        "tasks and add the numbers to the existing results JSON")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ data
class Captions:
    """Caption text -> token ids, cached (the world has a few thousand distinct captions)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - MEAN) / STD


def make_batch(rng: np.random.Generator, n: int, fill_groups: float, shape_groups: float):
    """Scenes and captions for one batch: random scenes, plus hard-negative groups that share
    every attribute but one (fill or shape), whose captions always name that attribute."""
    scenes, texts = [], []

    def group(attr: str, values, k_groups: int):
        for _ in range(k_groups):
            base = sample_scene(rng)
            fixed = {a: base.attribute(a) for a in ("shape", "colour", "fill", "size", "bg")}
            for v in values:
                fixed[attr] = v
                s = sample_scene(rng, **fixed)
                scenes.append(s)
                texts.append(caption(s, rng, must=(attr,)))

    group("fill", vocab.FILLS, int(n * fill_groups) // len(vocab.FILLS))
    k = 8
    for _ in range(int(n * shape_groups) // k):
        group("shape", list(rng.choice(vocab.SHAPES, size=k, replace=False)), 1)
    while len(scenes) < n:
        s = sample_scene(rng)
        scenes.append(s)
        texts.append(caption(s, rng))
    images = [render(s, "clean", rng) for s in scenes]
    return images, texts


# ------------------------------------------------------------------------------------ evaluation
def build_eval_sets(per_class: int, seed: int):
    sets = {}
    for attrs, domain in EVAL_SETS:
        task = WorldTask(name=f"pretrain-eval-{'-'.join(attrs)}-{domain}", attributes=attrs,
                         domain=domain, per_class=(per_class, 0, per_class))
        tr = list(task.generate("train", seed=seed + 1000))
        te = list(task.generate("test", seed=seed + 1000))
        sets[f"{'+'.join(attrs)}@{domain}"] = {
            "classnames": task.classnames, "template": task.template,
            "train_x": to_tensor([t[0] for t in tr]), "train_y": torch.tensor([t[1] for t in tr]),
            "test_x": to_tensor([t[0] for t in te]), "test_y": torch.tensor([t[1] for t in te]),
        }
    return sets


@torch.no_grad()
def encode_images(model, x: torch.Tensor, bs: int = 512) -> torch.Tensor:
    return torch.cat([F.normalize(model.encode_image(x[i:i + bs]), dim=-1)
                      for i in range(0, len(x), bs)])


def linear_probe(ftr, ytr, fte, yte, n_classes: int, l2: float = 1e-3) -> float:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS)."""
    w = torch.zeros(ftr.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")
    scale = 10.0  # features are unit-norm; give the probe a usable logit range

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(scale * ftr @ w + b, ytr) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return ((scale * fte @ w + b).argmax(1) == yte).float().mean().item()


@torch.no_grad()
def evaluate(model, tokenize, sets) -> dict:
    model.eval()
    out = {}
    for key, s in sets.items():
        ftr = encode_images(model, s["train_x"])
        fte = encode_images(model, s["test_x"])
        prompts = [s["template"].format(c) for c in s["classnames"]]
        t = F.normalize(model.encode_text(tokenize(prompts)), dim=-1)
        zs = ((fte @ t.T).argmax(1) == s["test_y"]).float().mean().item()
        lp = linear_probe(ftr, s["train_y"], fte, s["test_y"], len(s["classnames"]))
        out[key] = {"zero_shot": round(zs, 4), "linear_probe": round(lp, 4),
                    "chance": round(1 / len(s["classnames"]), 4)}
    model.train()
    return out


@torch.no_grad()
def task_report(model, tokenize) -> dict:
    """Every registered world task at full size: zero-shot on its test split (its own template)
    and a logistic-regression probe fitted on its train split, both on frozen image features."""
    model.eval()
    out = {}
    for name, task in TASKS.items():
        data = {s: list(task.generate(s, seed=0)) for s in ("train", "test")}
        f = {s: encode_images(model, to_tensor([d[0] for d in rows])) for s, rows in data.items()}
        y = {s: torch.tensor([d[1] for d in rows]) for s, rows in data.items()}
        t = F.normalize(model.encode_text(tokenize([task.template.format(c)
                                                    for c in task.classnames])), dim=-1)
        pred = (f["test"] @ t.T).argmax(1)
        k = len(task.classnames)
        base = y["test"] < (k + 1) // 2  # base = first ceil(n/2) classes, each scored within its half
        tb, tn = t[: (k + 1) // 2], t[(k + 1) // 2:]
        zs_base = ((f["test"][base] @ tb.T).argmax(1) == y["test"][base]).float().mean().item()
        zs_novel = ((f["test"][~base] @ tn.T).argmax(1) + (k + 1) // 2
                    == y["test"][~base]).float().mean().item()
        out[name] = {
            "domain": task.domain, "classes": k, "chance": round(1 / k, 4),
            "template": task.template, "n_train": len(data["train"]), "n_test": len(data["test"]),
            "zero_shot": round((pred == y["test"]).float().mean().item(), 4),
            "zero_shot_base": round(zs_base, 4), "zero_shot_novel": round(zs_novel, 4),
            "linear_probe": round(linear_probe(f["train"], y["train"], f["test"], y["test"], k), 4),
        }
        print(json.dumps({name: out[name]}), flush=True)
    return out


def load_shipped(model_name: str, weights: Path):
    open_clip.add_model_config(str(MODEL_CONFIGS))
    return open_clip.create_model(model_name, pretrained=str(weights))


# ------------------------------------------------------------------------------------------ main
def output_paths(args) -> tuple[Path, Path]:
    if args.out:
        return Path(args.out + ".safetensors"), Path(args.out + ".json")
    return (ROOT / "adapt" / "weights" / f"{args.model}-world.safetensors",
            ROOT / "experiments" / "results" / "pretrain_world.json")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    open_clip.add_model_config(str(MODEL_CONFIGS))
    weights, results = output_paths(args)
    if args.eval_only:
        log = json.loads(results.read_text())
        tokenize = Captions(open_clip.get_tokenizer(args.model))
        log["tasks"] = task_report(load_shipped(args.model, weights), tokenize)
        results.write_text(json.dumps(log, indent=1))
        return log
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    model = open_clip.create_model(args.model, output_dict=True)
    tokenize = Captions(open_clip.get_tokenizer(args.model))
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * args.lr * (1 + math.cos(math.pi * t))

    sets = build_eval_sets(args.eval_per_class, args.seed)
    log = {"args": vars(args), "model": args.model, "params": n_params, "curve": [], "evals": []}
    t0 = time.time()
    train_time = 0.0
    model.train()
    step = 0
    for step in range(args.steps):
        ts = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        images, texts = make_batch(rng, args.batch_size, args.fill_groups, args.shape_groups)
        out = model(to_tensor(images), tokenize(texts))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        train_time += time.time() - ts
        if step % 25 == 0 or step == args.steps - 1:
            rec = {"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step),
                   "logit_scale": round(model.logit_scale.exp().item(), 2),
                   "wall_s": round(time.time() - t0, 1)}
            log["curve"].append(rec)
            print(json.dumps(rec), flush=True)
        last = step == args.steps - 1
        overtime = (time.time() - t0) / 60 > args.max_minutes
        if (step + 1) % args.eval_every == 0 or last or overtime:
            ev = evaluate(model, tokenize, sets)
            log["evals"].append({"step": step + 1, "wall_s": round(time.time() - t0, 1), **ev})
            print(json.dumps({"step": step + 1, **{k: (v["zero_shot"], v["linear_probe"])
                                                    for k, v in ev.items()}}), flush=True)
        if overtime:
            print(f"stopping early at step {step + 1}: past --max-minutes", flush=True)
            break

    log["steps_done"] = step + 1
    log["train_s"] = round(train_time, 1)
    log["wall_s"] = round(time.time() - t0, 1)
    log["s_per_step"] = round(train_time / (step + 1), 3)
    log["final"] = log["evals"][-1]

    weights.parent.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"model": args.model, "seed": str(args.seed),
                                             "steps": str(step + 1)})
    log["checkpoint"] = str(weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights)
    log["checkpoint_bytes"] = os.path.getsize(weights)
    results.write_text(json.dumps(log, indent=1))
    # the task numbers come from the shipped fp16 file, loaded the way a user loads it
    log["tasks"] = task_report(load_shipped(args.model, weights), tokenize)
    results.write_text(json.dumps(log, indent=1))
    print(f"wrote {weights} ({log['checkpoint_bytes'] / 1e6:.2f} MB) and {results}", flush=True)
    return log


if __name__ == "__main__":
    main()
