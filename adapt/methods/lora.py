"""LoRA on CLIP's attention through peft (CLIP-LoRA, Zanella & Ben Ayed, CVPRW 2024), and DoRA.

Low-rank updates ``W + s·B·A`` on the query, key and value projections of every attention block
of both towers, trained with cross-entropy on CLIP's cosine logits under the dataset's first
hand-written template. open_clip's fused ``nn.MultiheadAttention`` is first rewritten into
separate projections (``adapt.split_attention``, exact), then peft injects its own LoRA layers
(``inject_adapter_in_model``); no LoRA layer is written here.

Defaults are CLIP-LoRA's (its ``run_utils.py`` / ``lora.py``): ``r=2``, ``alpha=1``, dropout
0.25 on the LoRA branch's input, q/k/v in all blocks of both towers, scaling ``alpha/sqrt(r)``
(its ``loralib`` scales that way: peft's ``use_rslora``), logits ``100 · cos`` with the scale
hard-coded rather than read from the model, A initialised Kaiming-uniform and B at zero (peft's
default, as there). The recipe carries its optimisation: AdamW lr 2e-4, weight decay 1e-2,
cosine per iteration to 1e-6 over 500 × shots iterations at batch 32.

Deliberate departures:
- the original merges the update into the weights and unmerges it around each forward; with
  dropout 0 that path computes wrong gradients for the first blocks. peft's layers add
  ``s·B·A·dropout(x)`` to the frozen layer's output, which is correct in every case;
- the original runs fp16 autocast on CUDA with a GradScaler; adapt uses the trainer's precision
  (bf16-mixed on GPUs that have it, fp32 on CPU);
- the dropout draws its mask as ``rand < 1 - p`` on the CPU (``adapt.fast_dropout``): the same
  Bernoulli distribution as ``nn.Dropout``, another random stream, a third of the cost;
- ``dora=true`` (the ``dora`` method) uses peft's DoRA on the same targets, which the original
  does not offer.

Exports also hold a peft adapter (``peft/adapter_config.json`` + ``peft/adapter_model.safetensors``)
that peft's ``set_peft_model_state_dict`` reads onto an open_clip model whose attention was split
the same way (README: "LoRA adapters in plain peft").
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from adapt.fast_dropout import use_mask_dropout
from adapt.methods.base import check_templates
from adapt.methods.registry import register_method
from adapt.methods.weight_space import BackboneTuning, check_towers, pick_layers
from adapt.split_attention import split_attention

# recipe names of the attention's projections -> SplitAttention's modules
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
PEFT_DIR = "peft"


@dataclass
class LoRAConfig:
    towers: list[str] = field(default_factory=lambda: ["image", "text"])  # CLIP-LoRA: both
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v"])  # q | k | v | o (output)
    layers: Optional[list[int]] = None  # block indices in each tower (negative: from the top); null = all
    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    rslora: bool = True  # scale alpha/sqrt(r) (CLIP-LoRA); false: alpha/r (the LoRA paper)
    dora: bool = False  # weight-decomposed updates (peft's use_dora)
    logit_scale: Optional[float] = 100.0  # CLIP-LoRA's fixed scale; null = the model's
    templates: Optional[list[str]] = None  # default: the dataset's first template
    ensemble: bool = False  # with the dataset's templates: all of them

    def __post_init__(self) -> None:
        check_towers(self.towers)
        check_templates(self.templates)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"targets must be a non-empty list from {sorted(TARGETS)}, got {list(self.targets)}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@register_method("lora")
class LoRA(BackboneTuning):
    Config = LoRAConfig
    trainable_kind = "low-rank attention updates"

    def change_backbone(self) -> list[str]:
        self.peft, names = add_lora(self.backbone, self.config)
        for dropouts in self.mode_modules():  # same distribution, a third of the CPU mask cost
            use_mask_dropout(dropouts)
        return names

    def mode_modules(self) -> list[nn.Module]:
        return [m.lora_dropout for m in self.backbone.modules() if hasattr(m, "lora_dropout")]

    def export_files(self) -> dict[str, bytes]:
        """peft's own adapter files: its config and its state dict (peft's key names)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save

        with tempfile.TemporaryDirectory() as tmp:
            self.peft.save_pretrained(tmp)
            config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.backbone.model).items()}
        return {f"{PEFT_DIR}/adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
                f"{PEFT_DIR}/adapter_model.safetensors": save(state)}


def add_lora(backbone, cfg):
    """Inject peft's LoRA layers into ``backbone`` (a method's own clone) where ``cfg`` says
    (``towers``, ``layers``, ``targets``, ``r``, ``alpha``, ``dropout``, ``rslora``, ``dora``): the
    attention is split first so peft can target q, k, v one by one. Returns the peft config and
    the names of the new trainable tensors under the backbone (MUST's LoRA variant uses it too)."""
    from peft import LoraConfig, inject_adapter_in_model

    for tower in cfg.towers:
        split_attention(b for _, b in pick_layers(backbone.blocks(tower), cfg.layers))
    names = [f"{name}.attn.{TARGETS[t]}" for tower in cfg.towers
             for name, _ in pick_layers(backbone.blocks(tower), cfg.layers) for t in cfg.targets]
    peft = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                      use_dora=cfg.dora, target_modules=names, bias="none")
    inject_adapter_in_model(peft, backbone.model)
    return peft, [n for n, p in backbone.named_parameters() if _is_lora(n)]


def _is_lora(name: str) -> bool:
    return ".lora_" in name


@dataclass
class DoRAConfig(LoRAConfig):
    dora: bool = True


@register_method("dora")
class DoRA(LoRA):
    """DoRA (Liu et al., ICML 2024) through peft with CLIP-LoRA's placement and recipe: a learned magnitude per output row times the direction of ``W + s·B·A``.

    No CLIP adaptation codebase offers it."""

    Config = DoRAConfig
    trainable_kind = "low-rank attention updates + magnitudes"
