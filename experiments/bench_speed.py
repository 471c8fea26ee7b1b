"""Speed and memory of adapt's default paths against what the original implementations do.

    python experiments/bench_speed.py [--quick] [--out DIR] [--threads 2] [--reference-repo DIR]

Figures go to a fresh temporary folder unless ``--out`` names one; the committed figures change
only with an explicit ``--out experiments/results`` (from a full, not ``--quick``, run).

ViT-B/16 architecture with random weights (``pretrained: null``: the real model's FLOPs), fp32,
CPU. Each workload runs a ``reference`` mode, doing what the original code does, and adapt's
``default`` mode, in this one process:

* Image tower, batch 32, no gradients (feature extraction, evaluation, TPT's views). reference:
  open_clip's own forward; default: the wrapper's fast blocks (``backbone.fast_blocks``); and the
  other chunking choice. Each as GFLOP/s and its fraction of a 2048² fp32 matmul timed between
  the interleaved rounds (target 60 %).
* Text tower in the CoOp step on cached features (forward + input-gradient backward): fast
  blocks and open_clip's, as fractions of that matmul (target 65 %), gradients compared.
* VPT / MaPLe / IVLP step at their recipes' batch 4: fast blocks against open_clip's (not slower).
* CoOp step (batch 32; 100 and 1000 classes). reference: the image encoder on every batch and
  every class prompt through all 77 positions; default: cached image features, prompts cut to
  the longest one, chunking + checkpointing where the automatic memory plan asks for them;
  default (images): the same with the image encoder in the loop (fast blocks).
* CoCoOp step (batch 32, 100 classes). reference: the original's per-image loop at its batch
  size 1 (image encoder, then 100 prompts × 77 positions per image); default: all 32 × 100
  prompts in one batched, truncated pass on cached features; default (images): the batch's
  images encoded in the loop, then that one pass.
* Tip-Adapter cache build + α/β search (16 shots × 100 classes, 10 augmented views, 4 val shots).
  reference: encode every view, then the original's double loop (200 β × 20 α, recomputing the
  affinities in every iteration); default: the views read from the feature cache, the
  registered ``tipadapter``'s search (affinities once per β, all α at once).
* TPT per test image (100 classes; and the memory of 1000). reference: the original's step
  (64 views encoded, 77-position prompts, the image re-encoded for the prediction); default: the
  registered ``tpt``.
* Zero-shot evaluation throughput (100 classes). reference: images encoded and class prompts
  (77 positions) encoded for every batch, as CoOp's test loop does through the model's forward;
  default: prompts once per evaluation; image features computed once and cached (cold: this run
  computes and writes them; warm: a later evaluation reads them).

* ``--reference-repo DIR``: a checkout of KaiyangZhou/CoOp (never copied or committed; see
  ``experiments/original_coop.py``). The CoOp and CoCoOp workloads then also time the original
  trainers' own ``forward_backward`` (``original`` mode; CoCoOp at its batch size 1) on the same
  inputs, interleaved with adapt's modes, and report adapt's speed-ups against it. The model
  becomes the OpenAI architecture (``ViT-B-16-quickgelu``; ``--quick``: ``test-vit-openai-77``) with
  its random weights rounded to fp16 (as the released weights are), which the original's
  ``clip.build_model`` then shares; its logits against adapt's are in the exactness checks.

* GPU (only when CUDA is present; otherwise skipped with a message): bf16-mixed, SDPA attention,
  absolute images/s and s/step.

The heap is under adapt's policy (adapt/process.py), started anew before each workload as a
run starts it: blocks above 1 MiB returned to the OS until the first graph-building pass, which
keeps that if checkpointed and otherwise switches to reusing freed blocks. ``--only image_tower,text_tower`` runs some workloads (a partial run never writes the committed
figures); ``--rounds`` sets the interleaved rounds of the rate rows.

Measurements that would not fit this machine's time or memory (reference 1000-class steps, the
16,000 image encodings of Tip-Adapter's cache) are extrapolated from measured ones and marked
"estimated". Writes bench_speed.json and bench_speed.md; ``--quick`` runs every code path at toy
sizes on a tiny model (a CI smoke test, no timing claims).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt import process  # noqa: E402
from experiments.benchlib import (classnames, flop_counter, PeakMemory, in_reference_mode, interleaved,  # noqa: E402
                                  linear_estimate, load_average, matmul_gflops, output_dir,
                                  rates_beside_matmul, reference_mode, start_heap, targets_met, timed,
                                  write_result)

FULL = dict(model="ViT-B-16", classes=100, many=1000, second=200, batch=32, steps=3, ref_steps=1,
            warmup=1, cocoop_ref_images=2, shots=16, views=10, val_shots=4, grid=(200, 20),
            tpt_views=64, eval_images=64, eval_batch=32, text_memory_mb=None, rounds=2, matmul_n=2048,
            prompt_batch=4)
QUICK = dict(model="adapt-tiny-vit", classes=10, many=40, second=20, batch=4, steps=1, ref_steps=1,
             warmup=1, cocoop_ref_images=1, shots=2, views=2, val_shots=1, grid=(8, 4), tpt_views=8,
             eval_images=8, eval_batch=4, text_memory_mb=4.0, rounds=1, matmul_n=256, prompt_batch=2)
TEMPLATE = ["a photo of a {}."]
SGD = dict(lr=0.002, momentum=0.9, weight_decay=5e-4)


def sgd_step(opt, logits, y):
    """One training step: cross-entropy of ``logits()`` against ``y``, backward, optimizer step."""
    def run():
        loss = F.cross_entropy(logits(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def unit_features(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator), dim=-1)


# the OpenAI CLIP architecture (QuickGELU, 64-wide heads), which the original's clip.build_model
# rebuilds from a state dict; the quick one is a test asset
OPENAI_MODEL = {"full": "ViT-B-16-quickgelu", "quick": "test-vit-openai-77"}  # the original: 77 tokens


class Bench:
    def __init__(self, cfg: dict, memory: PeakMemory, reference_repo=None):
        from adapt.backbone import BackboneConfig, build_backbone

        self.cfg, self.memory = cfg, memory
        torch.manual_seed(0)
        kw = {} if cfg["text_memory_mb"] is None else {"text_memory_mb": cfg["text_memory_mb"]}
        self.bb = build_backbone(BackboneConfig(name=cfg["model"], pretrained=None, **kw))
        self.size = self.bb.image_size
        self.d = self.bb.embed_dim
        self.gen = torch.Generator().manual_seed(0)
        self.rows: list[dict] = []
        self.checks: dict[str, float] = {}
        self.info: dict[str, object] = {}
        self.original = None
        if reference_repo is not None:
            from experiments.original_coop import OriginalCoOp, round_to_fp16

            round_to_fp16(self.bb)
            self.original = OriginalCoOp(reference_repo, self.bb)
            self.info["original"] = {"code": "KaiyangZhou/CoOp", "path": str(self.original.repo),
                                     "commit": self.original.commit}

    def original_trainer(self, kind: str, names: list[str], method):
        """The original's trainer for ``kind`` holding ``method``'s prompt values (its printing muted)."""
        import contextlib
        import io

        from experiments.original_coop import copy_prompt_state

        with contextlib.redirect_stdout(io.StringIO()):
            trainer = getattr(self.original, kind)(names)
        copy_prompt_state(trainer, method)
        return trainer

    def original_row(self, name: str, seconds: float, per: str, images: float, peak: float, what: str):
        o = self.info["original"]
        return self.row(name, "original", seconds, per, images, peak,
                        note=f"{o['code']} {o['commit']}: {what} forward_backward")

    def row(self, workload: str, mode: str, seconds: float, per: str, images: float,
            peak_mb: float, estimated: bool = False, note: str = "") -> dict:
        r = {"workload": workload, "mode": mode, "seconds": seconds, "per": per,
             "images_per_second": images / seconds if seconds > 0 else None,
             "peak_rss_mb": peak_mb, "estimated": estimated, "note": note}
        self.rows.append(r)
        print(f"  {workload:28s} {mode:18s} {seconds:9.3f} s/{per:6s} peak {peak_mb:8.0f} MB"
              f"{' (estimated)' if estimated else ''} {note}", flush=True)
        return r

    def images(self, n: int) -> torch.Tensor:
        return torch.randn(n, 3, self.size, self.size, generator=self.gen)

    # ------------------------------------------------------------------ CoOp -------------------
    def coop(self) -> None:
        from adapt.backbone_loading import text_memory_plan
        from adapt.methods import build_method

        c, bb = self.cfg, self.bb
        b = c["batch"]
        y = torch.randint(0, c["classes"], (b,), generator=self.gen)
        feats, images = unit_features(b, self.d, self.gen), self.images(b)
        # Many classes first, the automatic plan (chunking + checkpointing): a heap that reused
        # freed blocks earlier in the process (any graph-building pass without checkpointing)
        # holds ~0.3 GB more during a checkpointed step, which a run (one class count, its first
        # graph-building pass checkpointed) never does; see adapt/process.py.
        many = c["many"]
        big = build_method("coop", {"n_ctx": 16}, bb, classnames(many), TEMPLATE).train()
        y_big = torch.randint(0, many, (b,), generator=self.gen)
        opt_big = torch.optim.SGD(big.trainable_parameters(), **SGD)
        length_big = int(bb.eot_positions(big.prompts.tokens).max()) + 1
        chunk, ckpt = text_memory_plan(bb.config, many, length_big, bb.text_width, bb.text_depth, True)

        t_big, m_big = timed(sgd_step(opt_big, lambda: big.forward_features(feats), y_big), 1, 0, self.memory)
        del big, opt_big
        start_heap()  # the 100-class steps as their own run would start
        method = build_method("coop", {"n_ctx": 16}, bb, classnames(c["classes"]), TEMPLATE).train()
        opt = torch.optim.SGD(method.trainable_parameters(), **SGD)

        def step(x, from_images):
            def run():
                logits = method(x) if from_images else method.forward_features(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return run

        name = f"CoOp step, {c['classes']} classes"
        modes = {"default": (step(feats, False), c["steps"]),
                 "default (images)": (step(images, True), c["ref_steps"]),
                 "reference": (in_reference_mode(bb, step(images, True)), c["ref_steps"])}
        if self.original is not None:
            trainer = self.original_trainer("coop", classnames(c["classes"]), method)
            with torch.no_grad():
                self.checks["coop_original_vs_adapt_logits_max_abs"] = float(
                    (trainer.model(images) - method(images)).abs().max())
            modes["original"] = (lambda: trainer.forward_backward({"img": images, "label": y}), c["ref_steps"])
            rates = []  # the matmul rate between the interleaved rounds, for the bound below
            operands = torch.randn(c["matmul_n"], c["matmul_n"]), torch.randn(c["matmul_n"], c["matmul_n"])
            modes["matmul"] = (lambda: rates.append(matmul_gflops(c["matmul_n"], 3, operands)), c["ref_steps"] + 1)
        calls = {}
        got = interleaved(modes, self.memory, c["warmup"], calls)
        (t_def, m_def), (t_ref, m_ref) = got["default"], got["reference"]
        t_img, m_img = got["default (images)"]
        with reference_mode(bb):
            with torch.no_grad():
                ref_text = method.prompts.text_features()
        with torch.no_grad():
            self.checks["coop_truncated_vs_full_text_max_abs"] = float(
                (method.prompts.text_features() - ref_text).abs().max())
        full = int(method.prompts.tokens.shape[1])
        self.row(name, "reference", t_ref, "step", b, m_ref, note=f"image encoder + {full}-token prompts")
        r = self.row(name, "default", t_def, "step", b, m_def, note="cached features, truncated prompts")
        r["speedup"] = t_ref / t_def
        r_img = self.row(name, "default (images)", t_img, "step", b, m_img,
                         note="image encoder in the loop (fast blocks), truncated prompts")
        r_img["speedup"] = t_ref / t_img
        if self.original is not None:
            t_orig, m_orig = got["original"]
            self.original_row(name, t_orig, "step", b, m_orig, "trainers/coop.py")
            r["speedup_vs_original"], r_img["speedup_vs_original"] = t_orig / t_def, t_orig / t_img
            self.info["coop_images_bound"] = images_step_bound(
                step(images, True), lambda: trainer.forward_backward({"img": images, "label": y}),
                lambda: bb.encode_image(images), t_img, t_orig, max(rates))
            # round by round: the original's memory-bound step and adapt's compute-bound one
            # move differently with the machine's load
            self.info["coop_images_bound"]["round_ratios"] = [
                o / a for o, a in zip(calls["original"], calls["default (images)"])]
            del trainer

        # many classes, reference: at a second class count; time and memory grow linearly
        second = build_method("coop", {"n_ctx": 16}, bb, classnames(c["second"]), TEMPLATE).train()
        opt2 = torch.optim.SGD(second.trainable_parameters(), **SGD)
        y2 = torch.randint(0, c["second"], (b,), generator=self.gen)

        def second_step():
            loss = F.cross_entropy(second(images), y2)
            opt2.zero_grad(set_to_none=True)
            loss.backward()
            opt2.step()

        with reference_mode(bb):
            t2, m2 = timed(second_step, 1, 0, self.memory)
        del second, opt2
        pts_t, pts_m = [(c["classes"], t_ref), (c["second"], t2)], [(c["classes"], m_ref), (c["second"], m2)]
        self.info["coop_reference_points"] = {"classes": [c["classes"], c["second"]], "seconds": [t_ref, t2],
                                              "peak_rss_mb": [m_ref, m2]}
        self.per_class_ref_mb = (m2 - m_ref) / (c["second"] - c["classes"])
        name = f"CoOp step, {many} classes"
        self.row(name, "reference", linear_estimate(pts_t, many), "step", b, linear_estimate(pts_m, many),
                 estimated=True, note=f"extrapolated from {c['classes']} and {c['second']} classes")
        r = self.row(name, "default", t_big, "step", b, m_big,
                     note=f"auto plan: chunks of {chunk}, checkpointing {'on' if ckpt else 'off'}")
        r["speedup"] = linear_estimate(pts_t, many) / t_big
        self.info["coop_many_plan"] = {"chunk": chunk, "checkpoint": ckpt, "sequence_length": length_big}

    # ------------------------------------------------------------------ text tower -------------
    def text_tower(self) -> None:
        """The text tower inside the default CoOp step (forward + input-gradient backward of the
        class prompts): fast blocks against open_clip's, beside the matmul; same gradients."""
        from adapt.methods import build_method

        c, bb = self.cfg, self.bb
        method = build_method("coop", {"n_ctx": 16}, bb, classnames(c["classes"]), TEMPLATE).train()
        grad = torch.randn(c["classes"], self.d, generator=self.gen)

        def text_pass():
            method.prompts.text_features().backward(grad)

        with flop_counter() as counter:
            text_pass()
        flops = counter.get_total_flops()
        grads = {}
        for fast in (True, False):  # the context vectors' gradient, fast blocks against open_clip's
            with eager_blocks(bb, not fast):
                method.prompts.ctx.grad = None
                text_pass()
                grads[fast] = method.prompts.ctx.grad.clone()
        self.checks["coop_text_grad_fast_vs_eager_rel"] = float((grads[True] - grads[False]).norm() / grads[False].norm())
        got = rates_beside_matmul({"default": text_pass, "eager blocks": eager_blocks_fn(bb, text_pass)},
                                  {"default": flops, "eager blocks": flops}, c["rounds"], self.memory, c["matmul_n"])
        length = int(bb.eot_positions(method.prompts.tokens).max()) + 1
        self.info["coop_text"] = {"flops_per_step": flops, "seconds": got["default"]["seconds"],
                                  "gflops": got["default"]["gflops"], "fraction": got["default"]["fraction"],
                                  "eager_blocks_fraction": got["eager blocks"]["fraction"],
                                  "matmul_gflops": got["matmul_gflops"],
                                  "sequence_length": length, "full_length": int(method.prompts.tokens.shape[1])}


    # ------------------------------------------------------------------ image tower ------------
    def image_tower(self) -> None:
        """Feature extraction (no gradients) at the benchmark's batch: open_clip's own forward,
        the fast blocks at the automatic chunk size, and the other chunking choice."""
        from torch.profiler import ProfilerActivity, profile

        from adapt.backbone import AUTO_IMAGE_CHUNK

        c, bb = self.cfg, self.bb
        b = c["batch"]
        images = self.images(b)

        def batch_flops() -> int:  # one image's, times the batch
            with torch.no_grad(), flop_counter() as counter:
                bb.encode_image(images[:1])
            return counter.get_total_flops() * b

        flops = batch_flops()
        # open_clip's forward also runs its last block's patch-token rows; counted on the fast
        # blocks made to run them (the counter cannot see into nn.MultiheadAttention's fused
        # inference kernel, which open_clip's blocks take without gradients)
        bb._head = lambda i: 0
        try:
            reference_flops = batch_flops()
        finally:
            del bb._head
        other = 0 if AUTO_IMAGE_CHUNK else 8

        def encode(chunk=None):
            def run():
                saved, bb.config.image_chunk_size = bb.config.image_chunk_size, chunk
                try:
                    with torch.no_grad():
                        return bb.encode_image(images)
                finally:
                    bb.config.image_chunk_size = saved
            return run

        alt = f"fast, {'one pass' if not other else f'chunks of {other}'}"
        modes = {"reference": in_reference_mode(bb, encode()), "default": encode(), alt: encode(other)}
        got = rates_beside_matmul(modes, {**dict.fromkeys(modes, flops), "reference": reference_flops},
                                  c["rounds"], self.memory, c["matmul_n"])
        ref, fast = modes["reference"](), modes["default"]()
        self.checks["image_fast_vs_open_clip_rel"] = float((fast - ref).norm() / ref.norm())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            encode()()
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        self.info["image_profile_self_cpu_share"] = {
            e.key: e.self_cpu_time_total / total for e in sorted(
                prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]}
        name = f"image tower, batch {b}"
        notes = {"reference": "open_clip's forward (nn.MultiheadAttention)",
                 "default": f"fast blocks, chunks of {AUTO_IMAGE_CHUNK or b} images", alt: "fast blocks"}
        for mode in modes:
            g = got[mode]
            r = self.row(name, mode, g["seconds"], "batch", b, g["peak_rss_mb"],
                         note=f"{notes[mode]}; {g['gflops']:.0f} GFLOP/s = {100 * g['fraction']:.0f} % of matmul")
            r["speedup"] = got["reference"]["seconds"] / g["seconds"] if mode != "reference" else None
        self.info["image_tower"] = {"flops_per_batch": flops, "reference_flops_per_batch": reference_flops,
                                    "matmul_gflops": got["matmul_gflops"],
                                    **{m: got[m] for m in modes}}

    # ------------------------------------------------------------------ deep prompts -----------
    def prompt_steps(self) -> None:
        """Training through the image tower (VPT / MaPLe / IVLP at their recipes' batch 4): fast
        blocks against open_clip's blocks, each beside the matmul."""
        from adapt.methods import build_method

        c, bb = self.cfg, self.bb
        b = c["prompt_batch"]
        images = self.images(b)
        y = torch.randint(0, c["classes"], (b,), generator=self.gen)
        for name in ("vpt", "maple", "ivlp"):
            method = build_method(name, None, bb, classnames(c["classes"]), TEMPLATE).train()
            opt = torch.optim.SGD(method.trainable_parameters(), **SGD)

            def step(method=method, opt=opt):
                loss = F.cross_entropy(method(images), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            with flop_counter() as counter:
                step()
            flops = counter.get_total_flops()
            modes = {"default": step, "eager blocks": eager_blocks_fn(bb, step)}
            got = rates_beside_matmul(modes, dict.fromkeys(modes, flops), c["rounds"], self.memory, c["matmul_n"])
            label = f"{name.upper() if name != 'maple' else 'MaPLe'} step, batch {b}"
            for mode in ("eager blocks", "default"):
                g = got[mode]
                r = self.row(label, mode, g["seconds"], "step", b, g["peak_rss_mb"],
                             note=f"{g['gflops']:.0f} GFLOP/s = {100 * g['fraction']:.0f} % of matmul")
            r["speedup"] = got["eager blocks"]["seconds"] / got["default"]["seconds"]
            self.info[f"{name}_step"] = {"flops_per_step": flops, "matmul_gflops": got["matmul_gflops"],
                                         **{m: got[m] for m in modes}}
            del method, opt

    # ------------------------------------------------------------------ CoCoOp -----------------
    def cocoop(self) -> None:
        from adapt.methods import build_method

        c, bb = self.cfg, self.bb
        method = build_method("cocoop", None, bb, classnames(c["classes"]), TEMPLATE)
        method.train()
        self.info["cocoop_implementation"] = "registered cocoop"
        opt = torch.optim.SGD(method.trainable_parameters(), **SGD)
        b = c["batch"]
        feats = unit_features(b, self.d, self.gen)
        y = torch.randint(0, c["classes"], (b,), generator=self.gen)
        images = self.images(c["cocoop_ref_images"] + 1)

        batched = sgd_step(opt, lambda: method.forward_features(feats), y)

        counter = iter(range(10 ** 9))

        def per_image():  # the original: batch size 1, encoder + 100 full prompts per image
            i = next(counter) % len(images)
            loss = F.cross_entropy(method(images[i:i + 1]), y[i % b:i % b + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # its own stream: the later workloads' random inputs stay those of earlier runs
        batch_images = torch.randn(b, 3, self.size, self.size, generator=torch.Generator().manual_seed(1))

        batched_images = sgd_step(opt, lambda: method(batch_images), y)  # the image encoder in the loop

        with torch.no_grad():  # warm-up: a 2-image batched step's kernels, one per-image step
            method.forward_features(feats[:2])
        in_reference_mode(bb, per_image)()
        modes = {"reference": (in_reference_mode(bb, per_image), c["cocoop_ref_images"]),
                 "default": (batched, 1), "default (images)": (batched_images, 1)}
        if self.original is not None:
            trainer = self.original_trainer("cocoop", classnames(c["classes"]), method)
            trainer.model.eval()
            with torch.no_grad():
                self.checks["cocoop_original_vs_adapt_logits_max_abs"] = float(
                    (trainer.model(images[:2]) - method(images[:2])).abs().max())
            trainer.model.train()
            seen = iter(range(10 ** 9))

            def original_image():  # its config's batch size 1
                i = next(seen) % len(images)
                trainer.forward_backward({"img": images[i:i + 1], "label": y[i % b:i % b + 1]})
            original_image()  # its warm-up, as the reference's
            modes["original"] = (original_image, c["cocoop_ref_images"])
        got = interleaved(modes, self.memory)
        (t_def, m_def), (t_ref, m_ref) = got["default"], got["reference"]
        t_img, m_img = got["default (images)"]
        # exactness: the batched, truncated pass against the per-image loop over full prompts
        with torch.no_grad():
            batched_logits = method.forward_features(feats[:2])
            with reference_mode(bb):
                looped = torch.cat([method.forward_features(feats[i:i + 1]) for i in range(2)])
        self.checks["cocoop_batched_vs_per_image_max_abs"] = float((batched_logits - looped).abs().max())
        name = f"CoCoOp step, {c['classes']} classes"
        self.row(name, "reference", t_ref, "image", 1, m_ref, note=f"per-image loop, {bb.text.context_length}-token prompts")
        r = self.row(name, "default", t_def / b, "image", 1, m_def,
                     note=f"batch {b} in one truncated pass (registered cocoop)")
        r["speedup"] = t_ref / (t_def / b)
        r["seconds_per_step"] = t_def
        r_img = self.row(name, "default (images)", t_img / b, "image", 1, m_img,
                         note=f"batch {b}: image encoder in the loop, then one truncated prompt pass")
        r_img["speedup"] = t_ref / (t_img / b)
        r_img["seconds_per_step"] = t_img
        if self.original is not None:
            t_orig, m_orig = got["original"]
            self.original_row(name, t_orig, "image", 1, m_orig, "trainers/cocoop.py at batch 1,")
            r["speedup_vs_original"], r_img["speedup_vs_original"] = t_orig / (t_def / b), t_orig / (t_img / b)
            del trainer

    # ------------------------------------------------------------------ Tip-Adapter ------------
    def tip_adapter(self, workdir: Path) -> None:
        from adapt.data.feature_cache import FeatureCache, encode_items, fingerprint
        from adapt.data.items import Item
        from adapt.data.transforms import train_transform
        from adapt.methods import build_method

        c, bb, g = self.cfg, self.bb, self.gen
        n_cls, shots, views = c["classes"], c["shots"], c["views"]
        n_keys, n_val = n_cls * shots, n_cls * c["val_shots"]
        method = build_method("tipadapter", {"beta_steps": c["grid"][0], "alpha_steps": c["grid"][1]},
                              bb, classnames(n_cls), TEMPLATE)
        # features with class structure, so that the search has something to find
        protos = torch.randn(n_cls, self.d, generator=g)
        key_labels = torch.arange(n_cls).repeat_interleave(shots)
        val_labels = torch.arange(n_cls).repeat_interleave(c["val_shots"])
        view_feats = protos[key_labels] + 1.5 * torch.randn(views, n_keys, self.d, generator=g)
        val = F.normalize(protos[val_labels] + 1.5 * torch.randn(n_val, self.d, generator=g), dim=-1)
        keys = F.normalize(view_feats.mean(0), dim=-1)

        # cache build: encoding rate measured on one batch, times the views to encode
        batch = self.images(c["batch"])
        with torch.no_grad():
            t_batch, m_enc = timed(lambda: bb.encode_image(batch), 1, 1, self.memory)
        encode_s = t_batch / c["batch"] * views * n_keys
        items = [Item(f"train/{i:05d}.png", int(key_labels[i])) for i in range(n_keys)]
        transform = train_transform(self.size, bb.image_mean, bb.image_std, scale=(0.5, 1.0))
        cache_dir = workdir / "tip_cache"
        comps = fingerprint(bb, items, workdir, transform, dataset="bench", split="train", normalize=False)
        self.memory.reset()
        start = time.perf_counter()
        FeatureCache(cache_dir).save(comps, view_feats, key_labels)
        t_save = time.perf_counter() - start

        def warm():
            got = encode_items(bb, items, workdir, transform, views=views, dataset="bench", split="train",
                               normalize=False, cache_dir=cache_dir)
            assert got.hit
            return F.normalize(got.features.mean(0), dim=-1)

        t_warm, m_warm = timed(warm, 1, 1, self.memory)
        scale = 100.0  # the original code's hard-coded CLIP logit multiplier, Tip-Adapter's default
        clip_w = method.text_features

        def original_search():
            betas = [0.1 + i * (method.config.beta_max - 0.1) / c["grid"][0] for i in range(c["grid"][0])]
            alphas = [0.1 + i * (method.config.alpha_max - 0.1) / c["grid"][1] for i in range(c["grid"][1])]
            values = F.one_hot(key_labels, n_cls).float()
            best = (0.0, 0.0, 0.0)
            with torch.no_grad():
                for beta in betas:
                    for alpha in alphas:
                        affinity = val @ keys.t()
                        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
                        clip_logits = scale * val @ clip_w.t()
                        acc = float(((clip_logits + cache_logits * alpha).argmax(-1) == val_labels).float().mean())
                        if acc > best[0]:
                            best = (acc, alpha, beta)
            return best

        def adapt_search():
            method._set_cache(keys, key_labels)  # the state Tip-Adapter's setup builds
            method._val = (val, val_labels)
            return method.search_hparams()

        t_osearch, m_osearch = timed(original_search, 1, 0, self.memory)
        t_asearch, m_asearch = timed(adapt_search, 1, 0, self.memory)
        best, chosen = original_search(), adapt_search()
        self.checks["tip_search_same_choice"] = float(
            math.isclose(best[1], chosen["alpha"], abs_tol=1e-6) and math.isclose(best[2], chosen["beta"], abs_tol=1e-6))
        name = f"Tip-Adapter build+search, {shots}x{n_cls}"
        n_img = views * n_keys
        self.row(name, "reference", encode_s + t_osearch, "run", n_img, max(m_enc, m_osearch), estimated=True,
                 note=f"{n_img} encodes (rate of one batch x count) + loop search {t_osearch:.1f}s")
        self.row(name, "default (cold)", encode_s + t_save + t_asearch, "run", n_img, max(m_enc, m_asearch),
                 estimated=True, note=f"same encodes, written to the cache; search {t_asearch:.2f}s")
        r = self.row(name, "default (warm)", t_warm + t_asearch, "run", n_img, max(m_warm, m_asearch),
                     note="views read from the feature cache")
        r["speedup"] = (encode_s + t_osearch) / (t_warm + t_asearch)
        self.info["tip_search"] = {"reference_s": t_osearch, "default_s": t_asearch,
                                   "speedup": t_osearch / t_asearch, "grid": list(c["grid"])}

    # ------------------------------------------------------------------ TPT --------------------
    def tpt(self) -> None:
        from adapt.methods import build_method
        from adapt.methods.tpt import averaged_entropy

        c, bb = self.cfg, self.bb
        cfg = {"n_views": c["tpt_views"], "seed": 1}
        method = build_method("tpt", cfg, bb, classnames(c["classes"]), TEMPLATE).eval()
        image = self.images(1)[0]

        def original():  # TPT's code: views encoded in the step, the image again for the prediction
            with torch.no_grad():
                feats = bb.encode_image(method.views(image))
            ctx = method.prompts.ctx.detach().clone().requires_grad_(True)
            opt = torch.optim.AdamW([ctx], lr=method.config.lr, weight_decay=method.config.weight_decay)
            with torch.enable_grad():
                logits = bb.logits(feats, method.prompts.text_features(ctx))
                loss = averaged_entropy(logits[method.select(logits.detach())])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                return bb.logits(bb.encode_image(image[None]), method.prompts.text_features(ctx))

        got = interleaved({"default": (lambda: method.predict_one(image), 1),
                           "reference": (in_reference_mode(bb, original), 1)}, self.memory)
        (t_def, m_def), (t_ref, m_ref) = got["default"], got["reference"]
        with reference_mode(bb):
            ref_logits = original()
        self.checks["tpt_prediction_agrees"] = float(
            int(ref_logits.argmax()) == int(method.predict_one(image).argmax()))
        name = f"TPT per image, {c['classes']} classes"
        self.row(name, "reference", t_ref, "image", 1, m_ref, note=f"{c['tpt_views']} views, {bb.text.context_length}-token prompts")
        r = self.row(name, "default", t_def, "image", 1, m_def, note="registered tpt")
        r["speedup"] = t_ref / t_def
        many = build_method("tpt", cfg, bb, classnames(c["many"]), TEMPLATE).eval()
        t_many, m_many = timed(lambda: many.predict_one(image), 1, 0, self.memory)
        name = f"TPT per image, {c['many']} classes"
        est_t = t_ref * (c["many"] / c["classes"])
        est_m = m_ref + self.per_class_ref_mb * (c["many"] - c["classes"])
        self.row(name, "reference", est_t, "image", 1, est_m, estimated=True,
                 note="+ per-class cost of the full-length reference (CoOp points)")
        r = self.row(name, "default", t_many, "image", 1, m_many, note="auto chunking + checkpointing")
        r["speedup"] = est_t / t_many

    # ------------------------------------------------------------------ zero-shot eval ---------
    def zero_shot_eval(self, workdir: Path) -> None:
        from PIL import Image
        from torch.utils.data import DataLoader

        from adapt.data.feature_cache import encode_items
        from adapt.data.image_dataset import ImageDataset
        from adapt.data.items import Item
        from adapt.data.transforms import test_transform
        from adapt.methods import build_method, zero_shot_text_features

        c, bb = self.cfg, self.bb
        names = classnames(c["classes"])
        root = workdir / "eval_images"
        rng = np.random.default_rng(0)
        items = []
        for i in range(c["eval_images"]):
            path = root / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (self.size + 32, self.size + 48, 3), dtype=np.uint8)).save(path)
            items.append(Item(path.name, i % len(names)))
        transform = test_transform(self.size, bb.image_mean, bb.image_std)
        n = len(items)

        def reference():
            correct = 0
            loader = DataLoader(ImageDataset(items, root, transform), batch_size=c["eval_batch"])
            with torch.no_grad():
                for x, y in loader:
                    text = zero_shot_text_features(bb, names, TEMPLATE)  # every batch
                    correct += int((bb.logits(bb.encode_image(x), text).argmax(-1) == y).sum())
            return correct

        def default():
            zs = build_method("zeroshot", None, bb, names, TEMPLATE).eval()  # prompts once
            got = encode_items(bb, items, root, transform, dataset="bench", split="test",
                               cache_dir=workdir / "eval_cache", batch_size=c["eval_batch"])
            with torch.no_grad():
                logits = torch.cat([zs.forward_features(f) for f in got.features[0].split(c["eval_batch"])])
            return int((logits.argmax(-1) == got.labels).sum()), got.hit

        with reference_mode(bb):
            t_ref, m_ref = timed(reference, 1, 0, self.memory)
        self.memory.reset()
        start = time.perf_counter()
        cold_correct, hit = default()
        t_cold, m_cold = time.perf_counter() - start, self.memory.peak()
        assert not hit
        t_warm, m_warm = timed(default, 1, 0, self.memory)
        self.checks["eval_same_accuracy"] = float(cold_correct == reference())
        name = f"zero-shot eval, {c['classes']} classes"
        self.row(name, "reference", t_ref, "run", n, m_ref, note=f"images + {bb.text.context_length}-token prompts every batch")
        r = self.row(name, "default (cold)", t_cold, "run", n, m_cold, note="prompts once, features computed + cached")
        r["speedup"] = t_ref / t_cold
        r = self.row(name, "default (warm)", t_warm, "run", n, m_warm, note="prompts once, cached features")
        r["speedup"] = t_ref / t_warm


def images_step_bound(adapt_step, original_step, encode, t_adapt: float, t_orig: float, matmul: float) -> dict:
    """How far the images-in-the-loop CoOp step can go against the original on this machine:
    the FLOPs of each step (matrix products, convolutions, attention: ``flop_counter``) and of
    the image tower inside adapt's, and the ratio adapt would reach if all of its step ran at
    the matmul rate timed between the rounds (``ceiling``): no code that computes the same
    products gets past it on this machine."""
    def flops(fn, grad=True):
        with torch.set_grad_enabled(grad), flop_counter() as counter:
            fn()
        return counter.get_total_flops()

    f_adapt, f_orig, f_image = flops(adapt_step), flops(original_step), flops(encode, grad=False)
    floor = f_adapt / matmul / 1e9
    return {"adapt_step_gflop": f_adapt / 1e9, "original_step_gflop": f_orig / 1e9,
            "image_tower_gflop": f_image / 1e9, "matmul_gflops": matmul,
            "adapt_fraction_of_matmul": f_adapt / t_adapt / 1e9 / matmul,
            "original_fraction_of_matmul": f_orig / t_orig / 1e9 / matmul,
            "adapt_seconds_at_matmul_rate": floor, "ceiling_vs_original": t_orig / floor,
            "image_tower_seconds_at_matmul_rate": f_image / matmul / 1e9}


def bound_line(bound) -> list[str]:
    if not bound:
        return []
    return [f"Images-in-the-loop CoOp step against the original: adapt's step is {bound['adapt_step_gflop']:.0f} GFLOP "
            f"({bound['image_tower_gflop']:.0f} of them its image tower's forward, which no exact method skips), "
            f"the original's {bound['original_step_gflop']:.0f}; at the {bound['matmul_gflops']:.0f} GFLOP/s matmul rate "
            f"timed between the rounds adapt's step would take {bound['adapt_seconds_at_matmul_rate']:.2f} s, a ceiling of "
            f"{bound['ceiling_vs_original']:.2f}x the original (measured steps: adapt {100 * bound['adapt_fraction_of_matmul']:.0f} %, "
            f"the original {100 * bound['original_fraction_of_matmul']:.0f} % of the matmul rate); "
            "original / adapt round by round: " + ", ".join(f"{r:.2f}x" for r in bound.get("round_ratios", [])) + "."]


# ---------------------------------------------------------------------------- GPU ---------------
def gpu_figures(cfg: dict) -> dict:
    """Absolute figures on a CUDA device in bf16-mixed precision, attention through
    scaled_dot_product_attention (the fast blocks): images/s of feature extraction, s/step of
    CoOp (cached features), CoCoOp (batch 32), MaPLe (batch 4) and the peak memory of a
    1000-class CoOp step. Without a device it says so and records nothing else."""
    if not torch.cuda.is_available():
        msg = "no CUDA device here: the bf16-mixed GPU figures are skipped, not estimated"
        print(msg, flush=True)
        return {"skipped": msg}
    from adapt.backbone import BackboneConfig, build_backbone
    from adapt.methods import build_method

    dev = torch.device("cuda")
    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name=cfg["model"], pretrained=None), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def cuda_seconds(fn, steps=5, warmup=2):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    def trainer(name, n_cls, x, from_features, method_cfg=None):
        method = build_method(name, method_cfg, bb, classnames(n_cls), TEMPLATE).to(dev).train()
        opt = torch.optim.SGD(method.trainable_parameters(), **SGD)
        y = torch.randint(0, n_cls, (x.shape[0],), device=dev, generator=g)

        def step():
            with amp():
                logits = method.forward_features(x) if from_features else method(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    size, d, b = bb.image_size, bb.embed_dim, cfg["batch"]
    images = torch.randn(256, 3, size, size, device=dev, generator=g)

    def extract():
        with torch.no_grad(), amp():
            bb.encode_image(images)

    feats = F.normalize(torch.randn(b, d, device=dev, generator=g), dim=-1)
    out = {"device": torch.cuda.get_device_name(dev), "precision": "bf16-mixed",
           "attention": "scaled_dot_product_attention (fast blocks)",
           "feature_extraction_images_per_s": 256 / cuda_seconds(extract),
           "coop_step_s": cuda_seconds(trainer("coop", cfg["classes"], feats, True, {"n_ctx": 16})),
           "cocoop_step_s": cuda_seconds(trainer("cocoop", cfg["classes"], feats, True)),
           "maple_step_s": cuda_seconds(trainer("maple", cfg["classes"], images[:cfg["prompt_batch"]], False))}
    big = trainer("coop", cfg["many"], feats, True, {"n_ctx": 16})
    big()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    big()
    out["coop_many_classes"] = cfg["many"]
    out["coop_many_peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    print("GPU:", json.dumps(out), flush=True)
    return out


@contextmanager
def eager_blocks(bb, on: bool = True):
    """open_clip's own block forward (the fast path off), everything else as adapt's default."""
    saved = bb.config.fast_blocks
    bb.config.fast_blocks = saved and not on
    try:
        yield
    finally:
        bb.config.fast_blocks = saved


def eager_blocks_fn(bb, fn):
    def run():
        with eager_blocks(bb):
            return fn()
    return run


# ---------------------------------------------------------------------------- report ------------
TARGETS = [
    ("coop_speedup", "CoOp step, 100 classes: default vs reference", ">= 5x", lambda v: v >= 5),
    ("coop_many_peak_gb", "CoOp step, 1000 classes: peak resident memory", "<= 3 GB", lambda v: v <= 3),
    ("cocoop_speedup", "CoCoOp step: images/s, default vs per-image reference", ">= 5x", lambda v: v >= 5),
    ("text_fraction_of_matmul", "text tower in the CoOp step: FLOP rate / matmul rate", ">= 65 %",
     lambda v: v >= 0.65),
    ("image_fraction_of_matmul", "image tower inference, batch 32: FLOP rate / matmul rate", ">= 60 %",
     lambda v: v >= 0.6),
    # against the original code itself (only with --reference-repo)
    ("coop_vs_original", "CoOp step, cached features: vs the original trainers/coop.py", ">= 12x",
     lambda v: v >= 12),
    ("coop_images_vs_original", "CoOp step, image encoder in the loop: vs the original", ">= 2.5x",
     lambda v: v >= 2.5),
    ("cocoop_vs_original", "CoCoOp per image, cached features: vs the original (batch 1)", ">= 10x",
     lambda v: v >= 10),
] + [(f"{m}_step_speedup", f"{m} step, batch 4: fast blocks vs open_clip's blocks", ">= 1.0x (not slower)",
      lambda v: v >= 1.0) for m in ("vpt", "maple", "ivlp")]


def summarize(bench: Bench, matmul: float) -> dict:
    rows = {(r["workload"].split(",")[0] + ("/many" if str(bench.cfg["many"]) in r["workload"] else ""), r["mode"]): r
            for r in bench.rows}
    info = bench.info
    steps = {f"{m}_step_speedup": (lambda m=m: info[f"{m}_step"]["eager blocks"]["seconds"]
                                   / info[f"{m}_step"]["default"]["seconds"]) for m in ("vpt", "maple", "ivlp")}
    getters = {
        "coop_speedup": lambda: rows[("CoOp step", "default")]["speedup"],
        "coop_many_peak_gb": lambda: rows[("CoOp step/many", "default")]["peak_rss_mb"] / 1024,
        "coop_many_reference_peak_gb_estimated": lambda: rows[("CoOp step/many", "reference")]["peak_rss_mb"] / 1024,
        "cocoop_speedup": lambda: rows[("CoCoOp step", "default")]["speedup"],
        "coop_images_speedup": lambda: rows[("CoOp step", "default (images)")]["speedup"],
        "cocoop_images_speedup": lambda: rows[("CoCoOp step", "default (images)")]["speedup"],
        "coop_vs_original": lambda: rows[("CoOp step", "default")]["speedup_vs_original"],
        "coop_images_vs_original": lambda: rows[("CoOp step", "default (images)")]["speedup_vs_original"],
        "coop_images_ceiling_vs_original": lambda: info["coop_images_bound"]["ceiling_vs_original"],
        "cocoop_vs_original": lambda: rows[("CoCoOp step", "default")]["speedup_vs_original"],
        "cocoop_images_vs_original": lambda: rows[("CoCoOp step", "default (images)")]["speedup_vs_original"],
        "text_fraction_of_matmul": lambda: info["coop_text"]["fraction"],
        "image_fraction_of_matmul": lambda: info["image_tower"]["default"]["fraction"],
        **steps,
        "tip_warm_speedup": lambda: rows[("Tip-Adapter build+search", "default (warm)")]["speedup"],
        "tip_search_speedup": lambda: info["tip_search"]["speedup"],
        "tpt_speedup": lambda: rows[("TPT per image", "default")]["speedup"],
        "eval_cold_speedup": lambda: rows[("zero-shot eval", "default (cold)")]["speedup"],
        "eval_warm_speedup": lambda: rows[("zero-shot eval", "default (warm)")]["speedup"],
    }
    ratios = {}
    for key, get in getters.items():  # a partial run (--only) has only its own
        try:
            ratios[key] = get()
        except KeyError:
            pass
    return ratios


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Benchmark: {result['config']['model']} (random weights), fp32, CPU, {m['threads']} threads "
             f"({m['cpu']}); matmul rate {m['matmul_gflops']:.0f} GFLOP/s; allocator: {m['allocator']}; "
             f"load average before/after {m['load_average_before'][:1]}/{m['load_average_after'][:1]}. "
             f"{'QUICK smoke run: toy sizes, numbers mean nothing.' if result['quick'] else ''}", "",
             "| workload | mode | seconds | images/s | peak RSS (GB) | speed-up | notes |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ips = f"{r['images_per_second']:.2f}" if r["images_per_second"] else ""
        est = " (est.)" if r["estimated"] else ""
        sp = f"{r['speedup']:.1f}x" if r.get("speedup") else ""
        if r.get("speedup_vs_original"):
            sp += f" ({r['speedup_vs_original']:.1f}x vs original)"
        lines.append(f"| {r['workload']} | {r['mode']} | {r['seconds']:.3f}/{r['per']}{est} | {ips} | "
                     f"{r['peak_rss_mb'] / 1024:.2f}{est} | {sp} | {r['note']} |")
    lines += ["", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for key, label, goal, _ in TARGETS:
        if key not in result["targets"]:
            continue
        t = result["targets"][key]
        value = f"{100 * t['value']:.0f} %" if key.endswith("_fraction_of_matmul") else (
            f"{t['value']:.2f} GB" if key.endswith("_gb") else f"{t['value']:.1f}x")
        lines.append(f"| {label} | {value} | {goal} | {'yes' if t['met'] else 'NO'} |")
    text = result["info"].get("coop_text")
    lines += [""] + ([] if text is None else [f"Text tower in the default CoOp step: {text['flops_per_step'] / 1e9:.0f} GFLOP "
                  f"(forward + input-gradient backward, sequences cut from {text['full_length']} to "
                  f"{text['sequence_length']} positions) in {text['seconds']:.2f} s = {text['gflops']:.0f} GFLOP/s "
                  f"({100 * text['fraction']:.0f} % of the {text['matmul_gflops']:.0f} GFLOP/s matmul timed beside it; "
                  f"open_clip's blocks: {100 * text['eager_blocks_fraction']:.0f} %).",
              ]) + ["Every fraction is the best of interleaved rounds against a matmul timed between them "
              "(the machine may be shared: compare within one run).",
              "Heap policy at the end of each workload: " + ", ".join(
                  f"{k} {v}" for k, v in result["info"].get("heap_policy_at_end", {}).items()) + ".",
              gpu_line(result.get("gpu") or {}),
              original_line(result["info"].get("original")),
              *bound_line(result["info"].get("coop_images_bound")),
              "Exactness checks of this run: " + ", ".join(f"{k} = {v:.3g}" for k, v in result["checks"].items()) + "."]
    return "\n".join(lines) + "\n"


# in run order; tpt reads the CoOp reference's per-class memory, so it needs coop before it;
# coop's checkpointed 1000-class step comes before any other graph-building pass (see coop)
WORKLOADS = ("image_tower", "coop", "text_tower", "prompt_steps", "cocoop", "tip_adapter", "tpt",
             "zero_shot_eval", "gpu")


def original_line(original) -> str:
    if not original:
        return ("Original code: not given (--reference-repo); the reference rows emulate it in "
                "adapt's wrapper (open_clip's blocks, full-length prompts).")
    return (f"Original code: {original['code']} at {original['commit']}, imported from {original['path']} "
            "(its trainers' forward_backward on the same weights and inputs; never copied).")


def gpu_line(gpu: dict) -> str:
    if "skipped" in gpu or not gpu:
        return f"GPU (bf16-mixed, SDPA): {gpu.get('skipped', 'not run')}."
    return (f"GPU ({gpu['device']}, {gpu['precision']}, {gpu['attention']}): feature extraction "
            f"{gpu['feature_extraction_images_per_s']:.0f} images/s; CoOp step {gpu['coop_step_s']:.3f} s, "
            f"CoCoOp step {gpu['cocoop_step_s']:.3f} s, MaPLe step {gpu['maple_step_s']:.3f} s; "
            f"{gpu['coop_many_classes']}-class CoOp step peak {gpu['coop_many_peak_gpu_mb']:.0f} MB.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes on a tiny model (CI smoke test)")
    ap.add_argument("--out", default=None,
                    help="folder for bench_speed.json/.md (default: a new temporary folder; the "
                         "committed figures only with an explicit --out experiments/results)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None,
                    help=f"comma-separated workloads of {','.join(WORKLOADS)} (default: all; "
                         "a partial run never writes the committed figures)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the rate rows")
    ap.add_argument("--ref-steps", type=int, default=None,
                    help="interleaved rounds of the reference / original steps (default 1)")
    ap.add_argument("--reference-repo", default=None, metavar="DIR",
                    help="a checkout of https://github.com/KaiyangZhou/CoOp: time its trainers' own "
                         "forward_backward beside adapt's (CoOp, CoCoOp)")
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else list(WORKLOADS)
    if not set(only) <= set(WORKLOADS):
        raise SystemExit(f"--only: unknown workload(s) {sorted(set(only) - set(WORKLOADS))}; "
                         f"choose from {', '.join(WORKLOADS)}")
    out = output_dir(args.out, args.quick or only != list(WORKLOADS), "bench_speed")
    print(f"figures will be written to {out}", flush=True)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.ref_steps:
        cfg["ref_steps"] = args.ref_steps
    if args.reference_repo:
        cfg["model"] = OPENAI_MODEL["quick" if args.quick else "full"]
        if args.quick:
            import open_clip

            open_clip.add_model_config(ROOT / "tests" / "assets" / "model_configs")
    import logging

    logging.getLogger("adapt").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    allocator = start_heap()
    memory = PeakMemory()
    load_before = load_average()
    start = time.perf_counter()
    matmul = matmul_gflops(512 if args.quick else 2048)
    print(f"fp32 matmul: {matmul:.0f} GFLOP/s on {args.threads} threads", flush=True)
    bench = Bench(cfg, memory, args.reference_repo)
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        work = Path(tmp)
        for name in (n for n in only if n != "gpu"):
            fn = getattr(bench, name)
            start_heap()  # each workload starts with the heap a run starts with
            fn(work) if name in ("tip_adapter", "zero_shot_eval") else fn()
            bench.info.setdefault("heap_policy_at_end", {})[name] = process.heap_policy() or "not managed"
    gpu = gpu_figures(cfg) if "gpu" in only else {"skipped": "not in --only"}
    ratios = summarize(bench, matmul)
    result = {
        "quick": args.quick, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "machine": {"threads": args.threads, "matmul_gflops": matmul, "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "peak_memory_method": "VmHWM (clear_refs)" if memory.exact else "sampled RSS",
                    "allocator": allocator,
                    "load_average_before": load_before, "load_average_after": load_average()},
        "rows": bench.rows, "ratios": ratios, "gpu": gpu, "checks": bench.checks, "info": bench.info,
        "targets": targets_met(TARGETS, ratios),
        "workloads": only,
        "wall_seconds": time.perf_counter() - start,
    }
    write_result(out, "bench_speed", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
