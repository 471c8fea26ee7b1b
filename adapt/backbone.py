"""The frozen CLIP backbone: one open_clip model behind the hooks every method needs.

This is the only module that knows open_clip's internals. It re-runs the two towers' block loops
itself (never a copy of open_clip's model code) so methods can enter at three depths:

* text input: ``embed_tokens`` gives the token embeddings a method edits (CoOp context vectors);
* every layer, both towers: ``deep_prompts`` replace prompt slots before each block (IVLP, MaPLe,
  deep VPT); in the image tower an entry may be a function of the tokens entering its block (CAVPT);
* pixels: a method transforms the normalized image itself before calling ``encode_image`` (VP);
* patch embeddings: ``patch_mask`` [B, HW] with a ``mask_token`` [W] replaces the masked patches'
  embeddings by the token before the class token and positional embeddings are added (MUST's
  masked image modelling; ``backbone_ops.mask_patches``).

With no prompts both encoders equal open_clip's ``encode_text`` / ``encode_image`` to fp32
round-off, which ``tests/test_backbone.py`` pins.

Speed (``BackboneConfig.fast_blocks``, on by default): open_clip's blocks go through
``nn.MultiheadAttention``, whose CPU path spends a third of a ViT-B/16 forward outside the matrix
products (q/k/v re-laid out and rescaled, attention as two batched products and a softmax, head
permutes). The wrapper runs those same blocks itself, on the same weights (read live, so anything
that changes them stays exact): one fused q/k/v product, ``scaled_dot_product_attention`` on
strided views of it (a fused kernel, causal for the text tower), the head merge for free; without
gradients the image batch may go in chunks (``image_chunk_size``; one pass measured fastest).
Blocks it does not know (other classes, wrapped attention, hooks)
run open_clip's own forward. Each block also reports to the process's heap policy whether it built a
graph and whether it was checkpointed (``adapt/process.py``).

Frozen by default: a method that changes backbone weights (LoRA, LayerNorm / bias tuning,
WiSE-FT: ``Method.changes_backbone``) works on its own ``clone()``, so nothing it injects or trains
reaches any other model built on the same backbone (the zero-shot baseline, another run).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapt.backbone_loading import BackboneConfig, load_open_clip, text_memory_plan, text_tower
from adapt.backbone_ops import batched as _batched, project as _project, replace_slots as _replace_slots
from adapt.backbone_ops import mask_patches, resample_positions, slice_batch
from adapt.fused_blocks import block_pass, fused_block, fused_block_head, fused_block_ok

__all__ = ["BackboneConfig", "ClipBackbone", "build_backbone"]


class ClipBackbone(nn.Module):
    """A frozen open_clip model with prompt hooks; always in eval mode (open_clip's dropout and
    any batch statistics never change; a method's own injected modules set their mode)."""

    def __init__(self, model: nn.Module, tokenizer, config: BackboneConfig, preprocess_cfg: dict):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.image_size = int(_first(preprocess_cfg.get("size", 224)))
        self.image_mean = tuple(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.image_std = tuple(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.text = text_tower(model)
        self.preprocess_cfg = dict(preprocess_cfg)
        self.model.requires_grad_(False)
        self.model.eval()

    def clone(self) -> "ClipBackbone":
        """An independent copy: its own weights and modules (frozen), the same tokenizer and
        config. What a method changes on the copy never reaches this one."""
        return ClipBackbone(copy.deepcopy(self.model), self.tokenizer, self.config, self.preprocess_cfg)

    def blocks(self, tower: str) -> list[tuple[str, nn.Module]]:
        """``(name under model, block)`` for each transformer block of ``tower`` ("text" or
        "image"), in depth order: where weight-space methods put their updates."""
        blocks = self.text.transformer.resblocks if tower == "text" else self._vit().transformer.resblocks
        names = {id(m): n for n, m in self.model.named_modules()}
        return [(names[id(b)], b) for b in blocks]

    def tower_of(self, name: str) -> Optional[str]:
        """The tower ("image" / "text") a parameter or module name under ``model`` belongs to;
        None for the shared logit scale / bias."""
        if name.startswith("visual."):
            return "image"
        return None if name.split(".")[0] in ("logit_scale", "logit_bias") else "text"

    # -- frozen and always in eval mode: dropout / batch-norm statistics must never change -----
    def train(self, mode: bool = True):
        super().train(False)
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.model, "logit_bias", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @property
    def text_width(self) -> int:
        return self.text.token_embedding.weight.shape[1]

    @property
    def text_depth(self) -> int:
        return len(self.text.transformer.resblocks)

    @property
    def vision_width(self) -> int:
        return self._vit().conv1.out_channels

    @property
    def vision_depth(self) -> int:
        return len(self._vit().transformer.resblocks)

    @property
    def embed_dim(self) -> int:
        proj = self.text.text_projection
        if isinstance(proj, nn.Linear):
            return proj.out_features
        return proj.shape[1] if proj is not None else self.text_width

    # ---------------------------------------------------------------- text tower -------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        device = self.model.logit_scale.device
        return self.tokenizer(list(texts)).to(device)

    def token_count(self, text: str) -> int:
        """Number of BPE tokens of ``text`` between start- and end-of-text (CoOp's name length)."""
        tokens = self.tokenize([text])[0]
        return int(self.eot_positions(tokens[None])[0]) - 1

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.token_embedding(tokens).to(self.dtype)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled (end-of-text) token of each sequence."""
        if self.text.pool_type == "eos":
            return (tokens == self.text.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalized text features of token ids, the hook-free path (zero-shot classifiers)."""
        return self.encode_text_embeddings(self.embed_tokens(tokens), tokens)

    def encode_text_embeddings(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
        prompt_start: int = 1,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Encode token embeddings ``x`` [N, L, D] whose layout matches ``tokens`` [N, L].

        ``deep_prompts[i]`` ([n, D] or [N, n, D]), when given for layer ``i >= 1``, replaces the
        ``n`` embeddings at ``prompt_start`` before block ``i`` (layer 0's prompts are already in
        ``x``). Class-dimension chunking and activation checkpointing bound activation memory
        for many classes (recipe flags, or chosen by ``text_memory_plan`` when left automatic).
        """
        causal, n = self._text_is_causal(), x.shape[0]
        # a backward pass will run: through the prompts, or into the tower's own weights (LoRA)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(
            p is not None and p.requires_grad for p in deep_prompts or ()) or any(
            p.requires_grad for p in self.text.transformer.parameters()))
        eot = self.eot_positions(tokens)
        length = int(eot.max()) + 1 if causal else x.shape[1]
        chunk, ckpt = text_memory_plan(self.config, n, length, self.text_width, self.text_depth,
                                       grad, x.element_size())
        if not (chunk and n > chunk):
            return self._encode_text(x, tokens, deep_prompts, prompt_start, normalize, ckpt)
        # Chunks of prompts of similar length (each chunk is cut to its own longest prompt), put
        # back in order at the end. Split, not sliced: a slice's backward allocates all of x.
        order = torch.argsort(eot, stable=True) if causal else torch.arange(n, device=x.device)
        xs, ts = x[:, :length][order], tokens[order]
        prompts = [p[order] if p is not None and p.dim() == 3 and p.shape[0] == n else p
                   for p in deep_prompts] if deep_prompts is not None else None
        feats = torch.cat([
            self._encode_text(xc, tc, slice_batch(prompts, i * chunk, (i + 1) * chunk, n),
                              prompt_start, normalize, ckpt)
            for i, (xc, tc) in enumerate(zip(xs.split(chunk), ts.split(chunk)))])
        return feats[torch.argsort(order)]

    def encode_text_shared(
        self,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        tokens: torch.Tensor,
        deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
        prompt_start: int = 1,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Features [G, C, d] of the prompts ``cat(prefix[g], suffix[c])`` whose first P
        embeddings ``prefix`` [G, P, D] the caller declares shared by all C classes of a group:
        they go through the tower once per group (``adapt/text_prefix.py``; exact, with a
        fallback to the full sequences). ``tokens`` [C, L] are the classes' token ids."""
        from adapt.text_prefix import encode_shared_prefix  # it builds on this module's helpers
        return encode_shared_prefix(self, prefix, suffix, tokens, deep_prompts, prompt_start, normalize)

    def _encode_text(self, x, tokens, deep_prompts, prompt_start, normalize, ckpt) -> torch.Tensor:
        text, eot = self.text, self.eot_positions(tokens)
        x = self._text_hidden(x, tokens, deep_prompts, prompt_start, ckpt)
        x = x[torch.arange(x.shape[0], device=x.device), eot] if text.pool_type in ("argmax", "eos") else (
            x[:, 0] if text.pool_type == "first" else x[:, -1])
        x = _project(x, text.text_projection)
        return F.normalize(x, dim=-1) if normalize else x

    def _text_hidden(self, x, tokens, deep_prompts, prompt_start, ckpt) -> torch.Tensor:
        """The text tower's final hidden states [N, L', D] after ``ln_final``; L' is cut to the
        longest prompt when the tower is causal."""
        text = self.text
        eot = self.eot_positions(tokens)
        length = x.shape[1]
        if self._text_is_causal():
            # Causal attention: positions after the last end-of-text token never reach a pooled
            # feature, so cutting the batch (or chunk) to its longest prompt is exact and cheaper.
            length = int(eot.max()) + 1
        x = x[:, :length] + text.positional_embedding[:length].to(x.dtype)
        mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        causal = mask is not None and self._causal_mask()
        for i, block in enumerate(text.transformer.resblocks):
            prompt = deep_prompts[i] if deep_prompts is not None and i < len(deep_prompts) else None
            if i > 0 and prompt is not None:
                x = _replace_slots(x, prompt, prompt_start)
            x = self._run_block(block, x, mask, text.transformer, ckpt, causal)
        return text.ln_final(x)

    def _causal_mask(self) -> bool:
        """The text tower's mask is the standard causal one (0 on and below the diagonal, -inf
        above), so the attention kernel may take ``is_causal`` instead of reading a mask."""
        if getattr(self, "_causal_cache", None) is None:
            m = self.text.attn_mask
            self._causal_cache = bool(m.is_floating_point() and torch.equal(
                m, torch.full_like(m, float("-inf")).triu(1)))
        return self._causal_cache

    def _text_is_causal(self) -> bool:
        return self.text.attn_mask is not None and self.text.pool_type in ("argmax", "eos")

    # ---------------------------------------------------------------- image tower ------------
    def _vit(self):
        visual = self.model.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
            raise TypeError(
                f"this method needs a ViT image tower; {self.config.name!r} has "
                f"{type(visual).__name__}. Use a ViT backbone, or a text-side / feature method.")
        return visual

    def encode_image(
        self,
        images: torch.Tensor,
        prompts: Optional[torch.Tensor] = None,
        deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
        normalize: bool = True,
        patch_mask: Optional[torch.Tensor] = None,
        mask_token: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Normalized image features; ``prompts`` ([n, W] or [B, n, W]) are appended after the
        patch tokens before ``ln_pre``; ``deep_prompts[i]`` replaces them before block ``i >= 1``.
        A callable ``deep_prompts[i]`` (block 0 included) is a prompt computed from the tokens
        themselves (CAVPT): it is called with the image tokens entering block ``i`` ([B, 1 + HW, W],
        after ``ln_pre``, without prompt slots) and what it returns ([n, W] or [B, n, W], any n)
        replaces every prompt slot before that block. Prompt tokens are dropped before pooling,
        so any pool type stays exact. ``patch_mask`` [B, HW] (bool, row-major over the patch grid)
        replaces those patches' embeddings by ``mask_token`` [W] before the class token and
        positions are added."""
        images = images.to(self.dtype)
        hooked = prompts is not None or bool(deep_prompts) or patch_mask is not None
        chunk = self._image_chunk(images, hooked, prompts, deep_prompts)
        if chunk:
            return torch.cat([self.encode_image(x, slice_batch(prompts, i * chunk, (i + 1) * chunk, len(images)),
                                                slice_batch(deep_prompts, i * chunk, (i + 1) * chunk, len(images)),
                                                normalize,
                                                None if patch_mask is None else patch_mask[i * chunk:(i + 1) * chunk],
                                                mask_token)
                              for i, x in enumerate(images.split(chunk))])
        if not hooked and not self._fast_vit():
            feats = self.model.visual(images)
            feats = feats[0] if isinstance(feats, tuple) else feats
            return F.normalize(feats, dim=-1) if normalize else feats
        v = self._vit()
        if not hooked:  # the fast path without prompts: open_clip's own embedding, our block loop
            x, n_tokens = v._embeds(images), None
        else:
            if prompts is None and deep_prompts and not callable(deep_prompts[0]):
                prompts = deep_prompts[0]
            x, n_tokens, _ = self._vit_embed(images, prompts, patch_mask=patch_mask, mask_token=mask_token)
        for i, block in enumerate(v.transformer.resblocks):
            prompt = deep_prompts[i] if deep_prompts is not None and i < len(deep_prompts) else None
            if callable(prompt):
                x = torch.cat([x[:, :n_tokens], _batched(prompt(x[:, :n_tokens]), x.shape[0]).to(x.dtype)], dim=1)
            elif i > 0 and prompt is not None:
                x = _replace_slots(x, prompt, n_tokens)
            x = self._run_block(block, x, None, v.transformer, head=self._head(i))
        pooled, _ = v._pool(x[:, :n_tokens])
        feats = pooled @ v.proj if v.proj is not None else pooled
        return F.normalize(feats, dim=-1) if normalize else feats

    def _vit_embed(self, images: torch.Tensor, prompts: Optional[torch.Tensor] = None,
                   resample: bool = False, patch_mask: Optional[torch.Tensor] = None,
                   mask_token: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int, tuple[int, int]]:
        """The tokens entering block 0, [B, 1 + HW (+ n prompts), W] (class token, patches, then
        ``prompts`` before ``ln_pre``), the number of image tokens 1 + HW, and the patch grid.
        ``patch_mask`` / ``mask_token``: masked patch embeddings replaced by the token first.

        ``resample``: an image whose grid is not the model's own gets the positional embedding
        resampled to it (bicubic, ``align_corners=False``, the class position kept), as the
        dense-prediction originals do; without it such an image is refused in one message."""
        v = self._vit()
        x = v.conv1(images)
        grid = (x.shape[2], x.shape[3])
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        if patch_mask is not None:
            x = mask_patches(x, patch_mask, mask_token)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self._positions(grid, resample).to(x.dtype)
        n_tokens = x.shape[1]
        if prompts is not None:
            x = torch.cat([x, _batched(prompts, x.shape[0]).to(x.dtype)], dim=1)
        return v.ln_pre(x), n_tokens, grid

    def _positions(self, grid: tuple[int, int], resample: bool) -> torch.Tensor:
        pos = self._vit().positional_embedding
        side = round((pos.shape[0] - 1) ** 0.5)
        if grid == (side, side):
            return pos
        if not resample:
            size = self.image_size
            raise ValueError(
                f"images of this size give a {grid[0]}x{grid[1]} patch grid; {self.config.name!r} was "
                f"built for {side}x{side} ({size}x{size} pixels). Resize the images to {size}x{size}, "
                "or use encode_image_dense, which resamples the positional embedding.")
        return resample_positions(pos, grid)

    def encode_image_dense(self, images: torch.Tensor, outputs: Sequence[str] = ("pooled", "tokens"),
                           taps: Sequence[int] = (), prompts: Optional[torch.Tensor] = None,
                           deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                           normalize: bool = True, patch_mask: Optional[torch.Tensor] = None,
                           mask_token: Optional[torch.Tensor] = None):
        """What the image tower gives beyond the pooled feature, in one pass: a
        ``DenseImage`` with the requested ``outputs`` ("pooled", "tokens", "value") and the
        token maps after the blocks in ``taps``, with the patch grid (``adapt/dense.py``);
        ``patch_mask`` / ``mask_token`` as in ``encode_image``."""
        from adapt.dense import encode_image_dense  # it builds on this module's helpers
        return encode_image_dense(self, images, outputs, taps, prompts, deep_prompts, normalize,
                                  patch_mask, mask_token)

    def encode_text_dense(self, x: torch.Tensor, tokens: torch.Tensor,
                          deep_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                          prompt_start: int = 1, normalize: bool = True):
        """Token-level text outputs: a ``DenseText`` with the pooled feature (exactly
        ``encode_text_embeddings``'s) and every position's projected output up to the last
        end-of-text token, with its validity mask (``adapt/dense.py``)."""
        from adapt.dense import encode_text_dense
        return encode_text_dense(self, x, tokens, deep_prompts, prompt_start, normalize)

    def _fast_vit(self) -> bool:
        """The fast path can run this image tower: a plain ViT made of blocks it knows."""
        v = self.model.visual
        return (self.config.fast_blocks and hasattr(v, "_embeds") and hasattr(v, "_pool")
                and hasattr(v, "conv1") and not getattr(v, "output_tokens", False)
                and all(fused_block_ok(b) for b in v.transformer.resblocks))

    def _head(self, i: int) -> int:
        """Tokens block ``i`` of the image tower must output (0 = all): the last block of a tower
        pooled by its class token gives only that token (``fused_block_head``)."""
        v = self.model.visual
        last = i == len(v.transformer.resblocks) - 1
        return int(last and v.attn_pool is None and getattr(v, "pool_type", None) == "tok")

    def _image_chunk(self, images, hooked, prompts, deep_prompts) -> int:
        """Images per pass without gradients (0 = one pass): the fast path's cache-sized chunks."""
        size = self.config.image_chunk_size
        if size is None:
            size = AUTO_IMAGE_CHUNK if self.config.fast_blocks else 0  # measured: one pass
        if not size or images.shape[0] <= size or torch.is_grad_enabled():
            return 0
        if any(callable(p) for p in deep_prompts or ()):  # prompts computed from this batch's tokens
            return 0
        batched = [p for p in [prompts, *(deep_prompts or ())] if p is not None and p.dim() == 3]
        return size if all(p.shape[0] == images.shape[0] for p in batched) else 0

    # ---------------------------------------------------------------- shared -----------------
    def _run_block(self, block: nn.Module, x: torch.Tensor, mask, transformer,
                   ckpt: Optional[bool] = None, causal: bool = False, head: int = 0) -> torch.Tensor:
        """One block on batch-first ``x``; ``causal``: ``mask`` is the standard causal mask;
        ``head``: only the first ``head`` tokens' outputs are needed (the fast blocks give those)."""
        fast = self.config.fast_blocks and fused_block_ok(block, mask)
        batch_first = getattr(transformer, "batch_first", True)
        if not (batch_first or fast):
            x = x.transpose(0, 1)
        if fast and head and mask is None:
            fn, args = fused_block_head, (block, x, head)
        elif fast:
            fn, args = fused_block, (block, x, mask, causal)
        else:
            fn, args = block, (x, None, None, mask)
        if ckpt is None:  # the image tower: only when the recipe asks for it
            ckpt = self.config.grad_checkpointing is True
        # a backward pass will come through this block: its input or its own weights need it
        graph = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters()))
        x = block_pass(fn, args, graph, ckpt)
        return x if (batch_first or fast) else x.transpose(0, 1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP's logits of normalized features: ``exp(t) · f_img · f_txtᵀ (+ bias)``.

        ``text_features`` may be [C, d] (shared) or [B, C, d] (per-image prompts)."""
        scale = self.logit_scale
        if text_features.dim() == 3:
            logits = scale * torch.einsum("bd,bcd->bc", image_features, text_features.to(image_features.dtype))
        else:
            logits = scale * image_features @ text_features.to(image_features.dtype).t()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits


def build_backbone(config: BackboneConfig, device: Optional[torch.device | str] = None) -> ClipBackbone:
    model, tokenizer, preprocess_cfg = load_open_clip(config)
    backbone = ClipBackbone(model, tokenizer, config, preprocess_cfg)
    return backbone.to(device) if device is not None else backbone


# ------------------------------------------------------------------------------- helpers -----
# Images per no-gradient pass of the fast image tower when image_chunk_size is automatic; 0 =
# the whole batch at once. Measured on ViT-B/16, batch 32, 2 threads, best of 2 rounds beside a
# matmul (experiments/benchlib.rates_beside_matmul, on a heavily shared machine): one pass 74 %
# of the matmul rate, chunks of 16 71 %, chunks of 8 66 %, open_clip's forward 62 %. Rerun:
# experiments/bench_speed.py --only image_tower.
AUTO_IMAGE_CHUNK = 0


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value
