"""The joint ASR + NLU network: a shared Conformer encoder and three task heads.

::

    features (B, T, F) ──► ConvSubsampling (×4) ──► Conformer blocks ──► encoder (B, T', D)
                                                                          │
                      ┌──────────────────────────┬────────────────────────┤
                      ▼                          ▼                        ▼
            CTC head (B, T', C)       intent head (B, I)        parse decoder (B, U, P)
            characters                attention pooling          Transformer decoder with
                                                                  cross-attention

Padding never changes an output: padded frames are masked in attention, zeroed before
every depthwise convolution, and excluded from pooling, so a batch gives the same result
as its utterances one by one (tested). Normalisation is LayerNorm everywhere (no
BatchNorm, whose batch statistics would see the padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ConformerBlock",
    "ConformerEncoder",
    "ConvSubsampling",
    "EncoderConfig",
    "IntentHead",
    "JointModel",
    "JointOutput",
    "ModelConfig",
    "ParseDecoder",
    "SelfAttention",
    "chunk_attention_mask",
    "lengths_to_padding_mask",
]


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder hyper-parameters.

    Attributes:
        n_mels: input feature dimension F (log-mel bins).
        d_model: model width D.
        layers: number of Conformer blocks.
        heads: attention heads (must divide ``d_model``).
        ffn_mult: feed-forward width as a multiple of ``d_model``.
        conv_kernel: depthwise convolution kernel size (odd), in encoder frames.
        subsampling: time reduction of the front end, 4 (two stride-2 convs) or 6/8.
        dropout: dropout probability.
        causal_conv: depthwise convolutions see only the past (for streaming).
        pos_enc: add sinusoidal absolute positions after the front end, so attention
            can tell near frames from far ones from the first step of training.
        frontend_channels: channels of the convolutional front end (its cost grows with
            their square at a quarter of the input frame rate).
        inter_ctc_layer: also return the output of this block (1-based) for an
            intermediate CTC loss (Lee & Watanabe 2021), or 0 for none.
    """

    n_mels: int = 80
    d_model: int = 144
    layers: int = 6
    heads: int = 4
    ffn_mult: int = 4
    conv_kernel: int = 15
    subsampling: int = 4
    dropout: float = 0.1
    causal_conv: bool = False
    pos_enc: bool = True
    frontend_channels: int = 32
    inter_ctc_layer: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.inter_ctc_layer < max(1, self.layers):
            raise ValueError(
                f"inter_ctc_layer must lie in [0, {self.layers - 1}], got {self.inter_ctc_layer}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} not divisible by heads {self.heads}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        if self.subsampling not in (4, 6, 8):
            raise ValueError(f"subsampling must be 4, 6 or 8, got {self.subsampling}")


@dataclass(frozen=True)
class ModelConfig:
    """Whole-model hyper-parameters plus output sizes.

    Attributes:
        encoder: encoder settings.
        n_chars: CTC vocabulary size C (blank included): characters or words.
        n_intents: number of intents I.
        n_parse_tokens: parse-decoder vocabulary size P.
        decoder_layers: Transformer decoder layers; 0 = no parse decoder (the slots are
            read off a tagged CTC transcript instead).
        decoder_heads: decoder attention heads.
        decoder_ffn: decoder feed-forward width.
        max_parse_len: longest parse sequence U the decoder's positions cover.
        ctc_upsample: CTC frames per encoder frame. Spoken commands run up to ~22
            characters/s, leaving a 40 ms encoder barely more than one frame per
            character, which makes CTC slow to learn; emitting ``k`` label slots per
            encoder frame (one linear layer, then a reshape) gives CTC ``k×`` the frames
            at no encoder cost.
    """

    encoder: EncoderConfig
    n_chars: int
    n_intents: int
    n_parse_tokens: int
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_ffn: int = 576
    max_parse_len: int = 48
    ctc_upsample: int = 2


def lengths_to_padding_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``(B,)`` lengths → ``(B, T)`` bool mask, True where the frame is padding."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def chunk_attention_mask(
    frames: int, chunk: int, left_chunks: int | None = None, device: torch.device | None = None
) -> Tensor:
    """``(frames, frames)`` bool mask, True where query frame i may NOT attend key frame j.

    Frame i belongs to chunk ``i // chunk``; it may attend chunk ``c_j`` iff
    ``c_i - left_chunks <= c_j <= c_i`` (no lower bound when ``left_chunks`` is None).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 frame, got {chunk}")
    c = torch.arange(frames, device=device) // chunk
    blocked = c[None, :] > c[:, None]
    if left_chunks is not None:
        blocked |= c[None, :] < c[:, None] - left_chunks
    return blocked


class ConvSubsampling(nn.Module):
    """Convolutional front end: stride-2 3×3 convolutions, then a linear projection.

    Args:
        n_mels: input feature dimension F.
        d_model: output dimension D.
        factor: total time reduction (4 = two stride-2 convs; 6 = stride 2 then 3; 8 = three).

    Forward: ``x`` ``(B, T, F)``, ``lengths`` ``(B,)`` → ``(B, T', D)``, ``(B,)`` with
    ``T' = ((T - 1) // 2 - 1) // 2`` for factor 4 (each 3-wide, stride-s, unpadded conv maps
    ``L`` to ``(L - 3) // s + 1``). Each output frame depends only on input frames inside
    the utterance, so padding cannot leak in.
    """

    def __init__(self, n_mels: int, d_model: int, factor: int = 4, channels: int = 32) -> None:
        super().__init__()
        strides = {4: (2, 2), 6: (2, 3), 8: (2, 2, 2)}[factor]
        layers: list[nn.Module] = []
        in_channels, freq = 1, n_mels
        for stride in strides:
            # Time stride varies with the factor; frequency is always halved.
            layers += [nn.Conv2d(in_channels, channels, 3, stride=(stride, 2)), nn.ReLU()]
            in_channels = channels
            freq = (freq - 3) // 2 + 1
        self.strides = strides
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(channels * freq, d_model)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        for stride in self.strides:
            lengths = torch.div(lengths - 3, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv(x.unsqueeze(1))  # (B, channels, T', F')
        b, c, t, f = y.shape
        y = self.proj(y.transpose(1, 2).reshape(b, t, c * f))
        return y, self.output_lengths(lengths)


class _FeedForward(nn.Module):
    def __init__(self, d: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, d * mult),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(d * mult, d),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _ConvModule(nn.Module):
    """Pointwise-GLU → depthwise conv → LayerNorm → SiLU → pointwise; padding zeroed first."""

    def __init__(self, d: int, kernel: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pointwise_in = nn.Linear(d, 2 * d)
        self.causal = causal
        self.kernel = kernel
        self.depthwise = nn.Conv1d(d, d, kernel, groups=d, padding=0)
        self.depth_norm = nn.LayerNorm(d)
        self.pointwise_out = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad_mask: Tensor | None) -> Tensor:
        y = nn.functional.glu(self.pointwise_in(self.norm(x)), dim=-1)  # (B, T, D)
        if pad_mask is not None:
            y = y.masked_fill(pad_mask[..., None], 0.0)
        y = y.transpose(1, 2)  # (B, D, T)
        left = self.kernel - 1 if self.causal else (self.kernel - 1) // 2
        right = self.kernel - 1 - left
        y = self.depthwise(nn.functional.pad(y, (left, right)))
        y = nn.functional.silu(self.depth_norm(y.transpose(1, 2)))
        return self.dropout(self.pointwise_out(y))

    def forward_chunk(self, x: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor]:
        """Causal streaming step: ``x`` ``(B, C, D)`` new frames, ``cache`` ``(B, D, K-1)``
        (the gated inputs of the previous ``K-1`` frames; None = utterance start, zeros as
        in the padded full-sequence pass) → ``(B, C, D)`` and the next cache."""
        if not self.causal:
            raise ValueError("streaming needs causal convolutions (causal_conv=True)")
        y = nn.functional.glu(self.pointwise_in(self.norm(x)), dim=-1).transpose(1, 2)
        if cache is None:
            cache = y.new_zeros(y.size(0), y.size(1), self.kernel - 1)
        y = torch.cat([cache.to(y.dtype), y], dim=2)  # (B, D, K-1+C)
        new_cache = y[:, :, y.size(2) - (self.kernel - 1):]
        y = nn.functional.silu(self.depth_norm(self.depthwise(y).transpose(1, 2)))
        return self.dropout(self.pointwise_out(y)), new_cache


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, T, D)`` frames.

    Our own (rather than ``nn.MultiheadAttention``) so that the projections are plain
    ``nn.Linear`` layers (quantisation-aware training and int8 export treat them like
    every other matmul) and so that streaming can prepend cached keys/values.

    Forward: ``x`` ``(B, T, D)``; ``pad_mask`` ``(B, S)`` True on padded keys, where
    ``S = P + T`` with ``P`` the cached frames; ``attn_mask`` ``(T, S)`` True where a query
    may not attend; ``cache`` optional ``(k, v)`` each ``(B, P, D)`` from earlier frames.
    :meth:`forward` returns ``(B, T, D)``; :meth:`forward_with_cache` also returns the
    keys/values ``(B, S, D)`` of all frames so the caller can keep what it needs.
    """

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(
        self, x: Tensor, pad_mask: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        return self.forward_with_cache(x, pad_mask, attn_mask)[0]

    def forward_with_cache(
        self,
        x: Tensor,
        pad_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, d = x.shape
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        if cache is not None:
            k = torch.cat([cache[0].to(k.dtype), k], dim=1)
            v = torch.cat([cache[1].to(v.dtype), v], dim=1)
        s = k.size(1)
        h = self.heads

        def split(y: Tensor, n: int) -> Tensor:
            return y.reshape(b, n, h, d // h).transpose(1, 2)  # (B, H, n, D/H)

        blocked: Tensor | None = None
        if pad_mask is not None:
            blocked = pad_mask[:, None, None, :]
        if attn_mask is not None:
            blocked = attn_mask[None, None] if blocked is None else blocked | attn_mask[None, None]
        y = nn.functional.scaled_dot_product_attention(
            split(q, t), split(k, s), split(v, s),
            attn_mask=None if blocked is None else ~blocked,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Checkpoints from before this class used nn.MultiheadAttention's names.
        for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ConformerBlock(nn.Module):
    """One Conformer block (Gulati et al. 2020): ½FFN → MHSA → Conv → ½FFN → LayerNorm.

    Forward: ``x`` ``(B, T, D)``, ``pad_mask`` ``(B, T)`` (True = padding) or None,
    ``attn_mask`` ``(T, T)`` bool (True = may not attend; e.g. chunked streaming) or None
    → ``(B, T, D)``.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ff1 = _FeedForward(d, cfg.ffn_mult, cfg.dropout)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.heads, cfg.dropout)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.conv = _ConvModule(d, cfg.conv_kernel, cfg.dropout, cfg.causal_conv)
        self.ff2 = _FeedForward(d, cfg.ffn_mult, cfg.dropout)
        self.out_norm = nn.LayerNorm(d)

    def forward(
        self, x: Tensor, pad_mask: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        q = self.attn_norm(x)
        a = self.attn(q, pad_mask, attn_mask)
        x = x + self.attn_dropout(a)
        x = x + self.conv(x, pad_mask)
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x)

    def forward_chunk(
        self, x: Tensor, attn_cache: tuple[Tensor, Tensor] | None, conv_cache: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """One streaming step over a chunk ``x`` ``(B, C, D)`` that may attend to every
        cached frame and to the whole chunk.

        ``attn_cache``: keys/values ``(B, P, D)`` of earlier frames (the caller trims it
        to the left context); ``conv_cache``: see :meth:`_ConvModule.forward_chunk`.
        Returns the block output ``(B, C, D)``, keys/values of cache + chunk ``(B, P+C, D)``
        and the new convolution cache.
        """
        x = x + 0.5 * self.ff1(x)
        a, kv = self.attn.forward_with_cache(self.attn_norm(x), cache=attn_cache)
        x = x + self.attn_dropout(a)
        c, conv_cache = self.conv.forward_chunk(x, conv_cache)
        x = x + c
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x), kv, conv_cache


class ConformerEncoder(nn.Module):
    """Subsampling front end + a stack of Conformer blocks.

    Forward: ``feats`` ``(B, T, F)``, ``lengths`` ``(B,)`` (frames) →
    ``(B, T', D)`` encodings and ``(B,)`` encoder lengths. Padded output frames are zero.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.subsampling = ConvSubsampling(cfg.n_mels, cfg.d_model, cfg.subsampling,
                                           cfg.frontend_channels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.layers))

    def forward(
        self, feats: Tensor, lengths: Tensor, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        enc, enc_lengths, _ = self.forward_with_intermediate(feats, lengths, attn_mask)
        return enc, enc_lengths

    def forward_with_intermediate(
        self, feats: Tensor, lengths: Tensor, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """As :meth:`forward`, plus the output ``(B, T', D)`` of block ``inter_ctc_layer``
        (None when that is 0)."""
        if feats.dim() != 3 or feats.size(-1) != self.cfg.n_mels:
            raise ValueError(f"feats must be (B, T, {self.cfg.n_mels}), got {tuple(feats.shape)}")
        x, out_lengths = self.subsampling(feats, lengths)
        if x.size(1) == 0 or bool((out_lengths <= 0).any()):
            raise ValueError("utterance too short for the subsampling front end")
        if self.cfg.pos_enc:
            x = x + sinusoids(x.size(1), x.size(2)).to(x.dtype)
        pad_mask = lengths_to_padding_mask(out_lengths, x.size(1))
        x = self.dropout(x).masked_fill(pad_mask[..., None], 0.0)
        inter: Tensor | None = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, pad_mask, attn_mask)
            if i == self.cfg.inter_ctc_layer:
                inter = x.masked_fill(pad_mask[..., None], 0.0)
        return x.masked_fill(pad_mask[..., None], 0.0), out_lengths, inter


class IntentHead(nn.Module):
    """Attention pooling over encoder frames, then a two-layer classifier.

    Forward: ``enc`` ``(B, T', D)``, ``pad_mask`` ``(B, T')`` → logits ``(B, I)``.
    """

    def __init__(self, d: int, n_intents: int, dropout: float) -> None:
        super().__init__()
        self.score = nn.Linear(d, 1)
        self.classifier = nn.Sequential(
            nn.Linear(d, d), nn.SiLU(), nn.Dropout(dropout), nn.Linear(d, n_intents)
        )

    def forward(self, enc: Tensor, pad_mask: Tensor) -> Tensor:
        scores = self.score(enc).squeeze(-1).masked_fill(pad_mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, T')
        pooled = torch.einsum("bt,btd->bd", weights, enc)
        return self.classifier(pooled)


def sinusoids(length: int, dim: int, offset: int = 0) -> Tensor:
    """``(length, dim)`` sinusoidal encodings of positions ``offset … offset+length-1``."""
    position = torch.arange(offset, offset + length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class ParseDecoder(nn.Module):
    """Autoregressive Transformer decoder emitting the semantic parse as tokens.

    The parse ``[HassLightSet] [area] kitchen [brightness] fifty [eos]`` is produced
    token by token, attending to the encoder output.

    Forward: ``tokens`` ``(B, U)`` (starting with ``<bos>``), ``enc`` ``(B, T', D)``,
    ``enc_pad_mask`` ``(B, T')``, ``token_pad_mask`` ``(B, U)`` or None →
    logits ``(B, U, P)``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.encoder.d_model
        self.embed = nn.Embedding(cfg.n_parse_tokens, d)
        self.register_buffer("positions", sinusoids(cfg.max_parse_len + 1, d), persistent=False)
        layer = nn.TransformerDecoderLayer(
            d, cfg.decoder_heads, cfg.decoder_ffn, cfg.encoder.dropout,
            batch_first=True, norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.decoder_layers, norm=nn.LayerNorm(d))
        self.out = nn.Linear(d, cfg.n_parse_tokens)
        self.scale = math.sqrt(d)
        # Unit-variance token inputs after the √d scale, like the positions: nn.Embedding's
        # std-1 init times √d made the token embedding dominate the residual stream of
        # this pre-norm decoder, damping cross-attention (the path from audio to values).
        nn.init.normal_(self.embed.weight, std=d**-0.5)

    def forward(
        self,
        tokens: Tensor,
        enc: Tensor,
        enc_pad_mask: Tensor,
        token_pad_mask: Tensor | None = None,
    ) -> Tensor:
        u = tokens.size(1)
        if u > self.positions.size(0):
            raise ValueError(f"parse of {u} tokens exceeds max_parse_len {self.positions.size(0)}")
        x = self.embed(tokens) * self.scale + self.positions[:u]
        causal = torch.triu(torch.ones(u, u, dtype=torch.bool, device=tokens.device), 1)
        y = self.decoder(
            x, enc, tgt_mask=causal, tgt_key_padding_mask=token_pad_mask,
            memory_key_padding_mask=enc_pad_mask, tgt_is_causal=True,
        )
        return self.out(y)


@dataclass
class JointOutput:
    """Outputs of :class:`JointModel`.

    Attributes:
        encoder: ``(B, T', D)`` encodings (zero on padding).
        encoder_lengths: ``(B,)`` valid encoder frames.
        ctc_logits: ``(B, k·T', C)`` character logits, ``k = ctc_upsample``.
        ctc_lengths: ``(B,)`` valid CTC frames, ``k ×`` the encoder lengths.
        intent_logits: ``(B, I)``.
        parse_logits: ``(B, U, P)`` or None when no parse input was given (or the model
            has no parse decoder).
        inter_ctc_logits: ``(B, k·T', C)`` CTC logits of the intermediate block (same
            head), only in training mode with ``inter_ctc_layer`` set; else None.
    """

    encoder: Tensor
    encoder_lengths: Tensor
    ctc_logits: Tensor
    ctc_lengths: Tensor
    intent_logits: Tensor
    parse_logits: Tensor | None
    inter_ctc_logits: Tensor | None = None


class JointModel(nn.Module):
    """Shared encoder with CTC, intent and parse heads (see module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder.d_model
        self.encoder = ConformerEncoder(cfg.encoder)
        self.ctc_head = nn.Linear(d, cfg.n_chars * cfg.ctc_upsample)
        self.intent_head = IntentHead(d, cfg.n_intents, cfg.encoder.dropout)
        self.parse_decoder = ParseDecoder(cfg) if cfg.decoder_layers > 0 else None

    def encode(
        self, feats: Tensor, lengths: Tensor, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, F)``, ``(B,)`` → encodings ``(B, T', D)``, lengths ``(B,)``, pad mask."""
        enc, enc_lengths = self.encoder(feats, lengths, attn_mask)
        return enc, enc_lengths, lengths_to_padding_mask(enc_lengths, enc.size(1))

    def ctc(self, enc: Tensor, enc_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder ``(B, T', D)`` → CTC logits ``(B, k·T', C)`` and lengths ``(B,)``."""
        b, t, _ = enc.shape
        k = self.cfg.ctc_upsample
        return self.ctc_head(enc).reshape(b, t * k, self.cfg.n_chars), enc_lengths * k

    def forward(
        self,
        feats: Tensor,
        lengths: Tensor,
        parse_in: Tensor | None = None,
        parse_pad_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> JointOutput:
        """Run all heads.

        Args:
            feats: ``(B, T, F)`` normalised log-mel features.
            lengths: ``(B,)`` valid frames per utterance.
            parse_in: ``(B, U)`` decoder input tokens (teacher forcing) or None.
            parse_pad_mask: ``(B, U)`` True on padded decoder positions.
            attn_mask: ``(T', T')`` encoder attention mask (True = blocked), e.g. the
                chunk mask of streaming training (``model.inference.streaming.chunk_attention_mask``).
        """
        enc, enc_lengths, inter = self.encoder.forward_with_intermediate(feats, lengths, attn_mask)
        pad = lengths_to_padding_mask(enc_lengths, enc.size(1))
        parse_logits = (
            self.parse_decoder(parse_in, enc, pad, parse_pad_mask)
            if parse_in is not None and self.parse_decoder is not None else None
        )
        ctc_logits, ctc_lengths = self.ctc(enc, enc_lengths)
        inter_logits = self.ctc(inter, enc_lengths)[0] if inter is not None and self.training else None
        return JointOutput(
            encoder=enc,
            encoder_lengths=enc_lengths,
            ctc_logits=ctc_logits,
            ctc_lengths=ctc_lengths,
            intent_logits=self.intent_head(enc, pad),
            parse_logits=parse_logits,
            inter_ctc_logits=inter_logits,
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def min_input_frames(subsampling: int) -> int:
    """Fewest feature frames from which the conv front end (unpadded 3-wide convs, time
    strides 2,2 / 2,3 / 2,2,2) still emits one encoder frame: 7 for ×4 and ×6, 15 for ×8."""
    strides = {4: (2, 2), 6: (2, 3), 8: (2, 2, 2)}[subsampling]
    frames = 1
    for stride in reversed(strides):
        frames = (frames - 1) * stride + 3  # inverse of L -> (L - 3) // s + 1
    return frames
