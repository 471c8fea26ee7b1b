"""Learnable text context shared by the CoOp family (CoOp, CoCoOp, KgCoOp, UPL, TPT).

Prompts read ``[SOS] ctx_1 … ctx_M <class name> . [EOS]``; the context vectors are parameters, the
rest are frozen token embeddings kept as non-persistent buffers (rebuilt from the class names,
so a trained context can be applied to any class list).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from adapt.backbone import ClipBackbone

POSITIONS = ("end", "middle", "front")


def check_context_config(n_ctx: Optional[int], ctx_init: str, class_token_position: str) -> None:
    """The checks every CoOp-style Config runs in ``__post_init__``."""
    if class_token_position not in POSITIONS:
        raise ValueError(f"class_token_position={class_token_position!r} is not one of {POSITIONS}")
    if n_ctx is not None and n_ctx < 1 and not ctx_init:
        raise ValueError("n_ctx must be >= 1 (or give ctx_init)")


def check_init_length(n_ctx: Optional[int], ctx_init: str, prompts: "ContextPrompts") -> None:
    """CoOp-style methods take M from the initialisation text (``n_ctx: null``); an ``n_ctx``
    that says otherwise would be ignored without a word, so it is refused."""
    if ctx_init and n_ctx is not None and n_ctx != prompts.n_ctx:
        raise ValueError(
            f"method.n_ctx={n_ctx} but method.ctx_init={ctx_init!r} has {prompts.n_ctx} tokens, and the "
            f"initialisation text sets the number of context vectors; set method.n_ctx={prompts.n_ctx}, "
            f"or method.ctx_init='' for {n_ctx} random vectors")


def n_ctx_of(config) -> int:
    """The Config's ``n_ctx``, or its method's default M when it is null (with ``ctx_init`` the
    text's token count wins inside ``ContextPrompts``)."""
    return config.n_ctx if config.n_ctx is not None else type(config).DEFAULT_N_CTX


class ContextPrompts(nn.Module):
    def __init__(self, backbone: ClipBackbone, n_ctx: int, ctx_init: str = "", csc: bool = False,
                 position: str = "end", n_classes: int = 0, init_std: float = 0.02,
                 pad_to: Optional[int] = None, learned: bool = True, name_suffix: str = "."):
        """``name_suffix``: what follows the class name before [EOS] (CoOp's "."; DenseCLIP has
        nothing there). ``pad_to``: with ``ctx_init``, that many context vectors, the text's embeddings last and
        zero vectors before them (ProGrad's ``CTX_INIT`` padding); without it the text sets M.
        ``learned=False``: the context is always given to ``text_features`` (generated: SoftCPT),
        so the module holds none of its own."""
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class_token_position={position!r}; expected one of {POSITIONS}")
        self.backbone = [backbone]  # a list: not a submodule, the method owns the backbone
        self.position = position
        self.csc = csc
        self.name_suffix = name_suffix
        width = backbone.text_width
        if ctx_init:
            # initialise from the embeddings of a hand-written prompt; its words set M
            words = ctx_init.replace("_", " ").strip()
            n_ctx = backbone.token_count(words)
            with torch.no_grad():
                init = backbone.embed_tokens(backbone.tokenize([words]))[0, 1:1 + n_ctx].clone()
            if pad_to is not None:
                if pad_to < n_ctx:
                    raise ValueError(f"ctx_init={words!r} has {n_ctx} tokens, more than the {pad_to} "
                                     f"context vectors asked for; set n_ctx >= {n_ctx} or a shorter ctx_init")
                init = torch.cat([init.new_zeros(pad_to - n_ctx, width), init])
                words = " ".join(["X"] * (pad_to - n_ctx) + [words])
                n_ctx = pad_to
            if csc:
                init = init.unsqueeze(0).repeat(n_classes, 1, 1)
            self.prefix_text = words
        else:
            shape = (n_classes, n_ctx, width) if csc else (n_ctx, width)
            init = torch.empty(shape, dtype=backbone.dtype).normal_(std=init_std)
            self.prefix_text = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        if learned:
            self.ctx = nn.Parameter(init.to(backbone.dtype))
        else:  # a placeholder of the right shape, never trained nor saved
            self.register_buffer("ctx", torch.zeros_like(init, dtype=backbone.dtype), persistent=False)

    def build(self, classnames: Sequence[str]) -> None:
        """Tokenize ``"<prefix> <name><name_suffix>"`` per class and keep the frozen embedding pieces."""
        backbone = self.backbone[0]
        if self.csc and self.ctx.shape[0] != len(classnames):
            raise ValueError(f"class-specific context was learned for {self.ctx.shape[0]} classes, "
                             f"not {len(classnames)}")
        tokens = backbone.tokenize([f"{self.prefix_text} {name}{self.name_suffix}" for name in classnames])
        with torch.no_grad():
            emb = backbone.embed_tokens(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:].clone(), persistent=False)
        self.name_lens = [backbone.token_count(name) for name in classnames]

    def embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings [C, L, D] for context ``ctx`` ([M, D] shared or [C, M, D] per class)."""
        ctx = self.ctx if ctx is None else ctx
        n_cls = self.token_prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
        return self._assemble(ctx.unsqueeze(0))[0]

    def embeddings_per_image(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [B, C, L, D] for a per-image context (CoCoOp): ``ctx`` is [B, M, D]
        (image b's context, shared by all classes) or [B, C, M, D]."""
        if ctx.dim() == 3:
            ctx = ctx.unsqueeze(1).expand(-1, self.token_prefix.shape[0], -1, -1)
        if ctx.dim() != 4:
            raise ValueError(f"per-image context must be [B, M, D] or [B, C, M, D], got {tuple(ctx.shape)}")
        return self._assemble(ctx)

    def _assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """[N, C, L, D] from context [N, C, M, D]: every class's frozen pieces around its context,
        the class name at the end, middle or front (a loop over classes, never over N)."""
        n = ctx.shape[0]
        prefix = self.token_prefix.unsqueeze(0).expand(n, -1, -1, -1)
        suffix = self.token_suffix.unsqueeze(0).expand(n, -1, -1, -1)
        ctx = ctx.to(prefix.dtype)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=2)
        rows = []
        half = self.n_ctx // 2
        for i, length in enumerate(self.name_lens):
            name, rest, c = suffix[:, i, :length], suffix[:, i, length:], ctx[:, i]
            if self.position == "middle":
                rows.append(torch.cat([prefix[:, i], c[:, :half], name, c[:, half:], rest], dim=1))
            else:
                rows.append(torch.cat([prefix[:, i], name, c, rest], dim=1))
        return torch.stack(rows, dim=1)

    @property
    def shares_prefix(self) -> bool:
        """Every class's prompt starts with the same ``[SOS] ctx``: the class name at the end and
        one context for all classes (decided by the layout, never by the values: class-specific
        contexts initialised alike are equal but get their own gradients)."""
        return self.position == "end" and not self.csc

    def _shared_prefix(self, ctx: torch.Tensor) -> torch.Tensor:
        """[G, 1 + M, D] from ``ctx`` [M, D] (G = 1) or [B, M, D] (G = B)."""
        ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0)
        sos = self.token_prefix[:1].expand(ctx.shape[0], -1, -1)  # the same start token in every row
        return torch.cat([sos, ctx.to(sos.dtype)], dim=1)

    def text_features(self, ctx: torch.Tensor | None = None, deep_prompts=None,
                      prompt_start: int = 1, normalize: bool = True) -> torch.Tensor:
        """Class text features [C, d] (normalized unless told); ``deep_prompts`` as
        ``encode_text_embeddings``."""
        ctx = self.ctx if ctx is None else ctx
        backbone = self.backbone[0]
        if self.shares_prefix and ctx.dim() == 2:
            return backbone.encode_text_shared(self._shared_prefix(ctx), self.token_suffix, self.tokens,
                                               deep_prompts, prompt_start, normalize)[0]
        return backbone.encode_text_embeddings(self.embeddings(ctx), self.tokens, deep_prompts, prompt_start,
                                               normalize=normalize)

    def text_features_per_image(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalized text features [B, C, d] of the per-image prompts of ``embeddings_per_image``:
        all B·C prompts go through the text tower in one call (the backbone chunks it); a context
        [B, M, D] shared by the classes of each image runs its prefix once per image."""
        if self.shares_prefix and ctx.dim() == 3:
            return self.backbone[0].encode_text_shared(self._shared_prefix(ctx), self.token_suffix, self.tokens)
        emb = self.embeddings_per_image(ctx)
        b, c = emb.shape[:2]
        feats = self.backbone[0].encode_text_embeddings(emb.flatten(0, 1), self.tokens.repeat(b, 1))
        return feats.view(b, c, -1)
