"""RWKV time-mix (RWKV-6 x060, RWKV-7 x070) and channel-mix modules.

Parameter names and formulas follow BlinkDL/RWKV-LM (``RWKV_Tmix_x060`` / ``RWKV_Tmix_x070`` /
``RWKV_CMix_x060`` / ``RWKV_CMix_x070``), generalised to an attention width
``A = heads * head_size`` that may differ from the hidden size ``C`` (Qwen3).
``reset_parameters`` gives the standard RWKV initialisation for the layer index; the converter
then overwrites receptance/key/value/output (and the channel-mix key/value) with the teacher's
weights.

Every module takes the already-normalised input ``x [B, T, C]`` (zeroed at padded positions by
the caller) plus its recurrent state, and returns its output and the new state. ``segments``
(``shared.student.packing.PackedSegments``): packed rows, every document from a zero state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from shared.student.ops import RWKV7_LOG_DECAY_MIN, rwkv6_op, rwkv7_op
from shared.student.packing import PackedSegments


def _ratios(layer_idx: int, num_layers: int) -> tuple[float, float]:
    """RWKV-LM's depth ratios: ratio_0_to_1 and ratio_1_to_almost0."""
    return layer_idx / max(num_layers - 1, 1), 1.0 - layer_idx / num_layers


def _ortho(weight: torch.Tensor, scale: float) -> None:
    # RWKV-LM's ortho_init: gain sqrt(rows/cols) for tall matrices, times the scale
    if getattr(weight, "_is_hf_initialized", False):  # loaded by from_pretrained: keep it
        return
    rows, cols = weight.shape[-2], weight.shape[-1]
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    if weight.dim() == 2:
        init.orthogonal_(weight, gain=gain * scale)
    else:
        for sub in weight:
            init.orthogonal_(sub, gain=gain * scale)


def _lora_dim(factor: float, size: int, power: float = 0.5) -> int:
    return max(32, int(round(factor * size**power / 32) * 32))


def token_shift(x: torch.Tensor, last: torch.Tensor | None,
                segments: PackedSegments | None = None) -> torch.Tensor:
    """x_{t-1} for every t; the first step sees the cached last token (zeros at sequence start),
    and with ``segments`` the first token of every packed document sees zeros."""
    first = torch.zeros_like(x[:, :1]) if last is None else last.unsqueeze(1).to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    return shifted if segments is None else shifted * segments.continues.to(x.dtype)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The teacher's rotary position embedding on ``x [B, T, H, D]``; ``rope`` is the
    ``(cos, sin)`` pair its rotary module gives (``[B or 1, T, D]``), as Llama's attention uses."""
    cos, sin = (z.unsqueeze(2).to(x.dtype) for z in rope)
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"rotary embedding of width {cos.shape[-1]} for heads of {x.shape[-1]}: "
                         "RAD-RWKV7 needs a teacher whose RoPE covers the whole head")
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def head_norm(o: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm`` (a GroupNorm with one group per head) of the WKV output ``o [B, T, H, K]``,
    returned as ``[B, T, H*K]``: layer_norm over each head's K channels, then the per-channel
    affine. The same numbers as ``norm(o.reshape(B*T, H*K))``, but its backward is
    layer_norm's: GroupNorm's (GammaBeta1dBackward) took 2.5 ms a layer at 32 x 1024 tokens on
    an H200, a twentieth of a 135M student's kd step (BENCHMARKS.md, 2026-12-01)."""
    bsz, t, h, k = o.shape
    normed = F.layer_norm(o, (k,), eps=norm.eps)
    return torch.addcmul(norm.bias.view(h, k), normed, norm.weight.view(h, k)).view(bsz, t, h * k)


class _RWKVModule(nn.Module):
    """Common bits: the RWKV init is skipped while parameters hold no data — on the meta device
    (``convert_teacher``, ``from_pretrained``) or partitioned by DeepSpeed ZeRO-3 (empty tensors);
    those weights are filled later (copied, loaded, or re-initialised through ``_init_weights``)."""

    def _on_meta(self) -> bool:
        return any(p.is_meta or p.numel() == 0 for p in self.parameters())

    def reset_parameters(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _init_projections_and_norm(self) -> None:
        """Time-mix tail shared by x060 and x070: zero output projection and biases, GroupNorm
        weight at RWKV-LM's layer_scale ((1 + layer) / layers) ** 0.7."""
        init.zeros_(self.output.weight)
        for lin in (self.receptance, self.key, self.value, self.output):
            if lin.bias is not None:
                init.zeros_(lin.bias)
        init.constant_(self.ln_x.weight, ((1 + self.layer_idx) / self.num_layers) ** 0.7)
        init.zeros_(self.ln_x.bias)


class RWKV6TimeMix(_RWKVModule):
    """RWKV-6 (x060) time mixing with data-dependent token shift and decay."""

    def __init__(self, hidden_size: int, num_heads: int, head_size: int, layer_idx: int,
                 num_layers: int, qkv_bias: bool = False, o_bias: bool = False,
                 kernel: str = "auto", chunk_size: int = 16) -> None:
        super().__init__()
        c, a = hidden_size, num_heads * head_size
        self.hidden_size, self.num_heads, self.head_size = hidden_size, num_heads, head_size
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.kernel, self.chunk_size = kernel, chunk_size
        mix_lora, decay_lora = (32, 64) if c < 4096 else (64, 128)  # RWKV-LM doubles both at 4096
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(c)))
        self.time_maa_w1 = nn.Parameter(torch.empty(c, 5 * mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, mix_lora, c))
        self.time_decay = nn.Parameter(torch.empty(a))
        self.time_decay_w1 = nn.Parameter(torch.empty(c, decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_lora, a))
        self.time_faaaa = nn.Parameter(torch.empty(num_heads, head_size))
        self.receptance = nn.Linear(c, a, bias=qkv_bias)
        self.key = nn.Linear(c, a, bias=qkv_bias)
        self.value = nn.Linear(c, a, bias=qkv_bias)
        self.gate = nn.Linear(c, a, bias=False)
        self.output = nn.Linear(a, c, bias=o_bias)
        self.ln_x = nn.GroupNorm(num_heads, a, eps=64e-5)  # x060: 1e-5 * head_size_divisor(8)**2
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self._on_meta():
            return
        c, a = self.hidden_size, self.num_heads * self.head_size
        r01, r1a0 = _ratios(self.layer_idx, self.num_layers)
        ddd = torch.arange(c, dtype=torch.float64) / c
        n = torch.arange(a, dtype=torch.float64)
        init.copy_(self.time_maa_x, 1.0 - ddd.pow(r1a0))
        init.copy_(self.time_maa_w, 1.0 - ddd.pow(r1a0))
        init.copy_(self.time_maa_k, 1.0 - ddd.pow(r1a0))
        init.copy_(self.time_maa_v, 1.0 - (ddd.pow(r1a0) + 0.3 * r01))
        init.copy_(self.time_maa_r, 1.0 - ddd.pow(0.5 * r1a0))
        init.copy_(self.time_maa_g, 1.0 - ddd.pow(0.5 * r1a0))
        init.zeros_(self.time_maa_w1)
        init.uniform_(self.time_maa_w2, -0.01, 0.01)
        init.copy_(self.time_decay, -6 + 5 * (n / max(a - 1, 1)).pow(0.7 + 1.3 * r01))
        init.zeros_(self.time_decay_w1)
        init.uniform_(self.time_decay_w2, -0.01, 0.01)
        zigzag = ((n + 1) % 3 - 1) * 0.1
        faaaa = r01 * (1 - n / max(a - 1, 1)) + zigzag
        init.copy_(self.time_faaaa, faaaa.view(self.num_heads, self.head_size))
        for lin, scale in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0),
                           (self.gate, 0.1)):
            _ortho(lin.weight, scale)
        self._init_projections_and_norm()

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                wkv: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                v_first: torch.Tensor | None = None, segments: PackedSegments | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        bsz, t, _ = x.shape
        h, n = self.num_heads, self.head_size
        xx = token_shift(x, shift, segments) - x
        xxx = x + xx * self.time_maa_x
        mix = torch.tanh(xxx @ self.time_maa_w1).view(bsz, t, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->btfc", mix, self.time_maa_w2).unbind(dim=2)
        r = self.receptance(x + xx * (self.time_maa_r + mr))
        k = self.key(x + xx * (self.time_maa_k + mk))
        v = self.value(x + xx * (self.time_maa_v + mv))
        g = F.silu(self.gate(x + xx * (self.time_maa_g + mg)))
        xw = x + xx * (self.time_maa_w + mw)
        ww = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_w = -torch.exp(ww.float())  # decay = exp(-exp(ww)); float32 for the exp
        if token_mask is not None:  # a padded step must not write into the state (left padding)
            v = v * token_mask.unsqueeze(-1).to(v.dtype)
        o, wkv = rwkv6_op(r.view(bsz, t, h, n), k.view(bsz, t, h, n), v.view(bsz, t, h, n),
                          log_w.view(bsz, t, h, n), self.time_faaaa, wkv, self.kernel,
                          self.chunk_size, segments)
        o = head_norm(o, self.ln_x)
        return self.output(o * g), x[:, -1], wkv, v_first


class RWKV7TimeMix(_RWKVModule):
    """RWKV-7 (x070) time mixing; ``is_first`` marks the layer whose values become ``v_first``."""

    def __init__(self, hidden_size: int, num_heads: int, head_size: int, layer_idx: int,
                 num_layers: int, is_first: bool, qkv_bias: bool = False, o_bias: bool = False,
                 kernel: str = "auto", chunk_size: int = 16, variant: str = "x070") -> None:
        super().__init__()
        c, a = hidden_size, num_heads * head_size
        self.hidden_size, self.num_heads, self.head_size = hidden_size, num_heads, head_size
        self.layer_idx, self.num_layers, self.is_first = layer_idx, num_layers, is_first
        self.kernel, self.chunk_size = kernel, chunk_size
        # rad (RADLADS' RAD-RWKV7): no token shift, no bonus, RoPE on r/k: the converted layer
        # keeps the teacher's positional behaviour and has fewer new parameters to learn
        self.variant = variant
        if variant == "x070":
            for name in ("r", "w", "k", "v", "a", "g"):
                setattr(self, f"x_{name}", nn.Parameter(torch.empty(c)))
        lora = {"w": _lora_dim(2.5, c), "a": _lora_dim(2.5, c), "v": _lora_dim(1.7, c),
                "g": _lora_dim(5, c)}
        # the first RWKV-7 layer has no value residual, so it gets no v0/v1/v2 (they would never
        # train)
        for name in ("w", "a", "g") if is_first else ("w", "a", "v", "g"):
            setattr(self, f"{name}1", nn.Parameter(torch.empty(c, lora[name])))
            setattr(self, f"{name}2", nn.Parameter(torch.empty(lora[name], a)))
            if name != "g":
                setattr(self, f"{name}0", nn.Parameter(torch.empty(a)))
        self.k_k = nn.Parameter(torch.empty(a))
        self.k_a = nn.Parameter(torch.empty(a))
        if variant == "x070":
            self.r_k = nn.Parameter(torch.empty(num_heads, head_size))
        self.receptance = nn.Linear(c, a, bias=qkv_bias)
        self.key = nn.Linear(c, a, bias=qkv_bias)
        self.value = nn.Linear(c, a, bias=qkv_bias)
        self.output = nn.Linear(a, c, bias=o_bias)
        self.ln_x = nn.GroupNorm(num_heads, a, eps=head_size * 1e-5)  # x070: 64e-5 at head size 64
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self._on_meta():
            return
        c, a, hs = self.hidden_size, self.num_heads * self.head_size, self.head_size
        r01, r1a0 = _ratios(self.layer_idx, self.num_layers)
        ddd = torch.arange(c, dtype=torch.float64) / c
        if self.variant == "x070":
            for name, power in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9),
                                ("g", 0.2)):
                init.copy_(getattr(self, f"x_{name}"), 1.0 - ddd.pow(power * r1a0))
            init.constant_(self.r_k, -0.04)
        n = torch.arange(a, dtype=torch.float64)
        linear = n / max(a - 1, 1) - 0.5
        zigzag = ((n % hs) - (hs - 1) / 2) / max((hs - 1) / 2, 1e-9)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(a - 1, 1)).pow(1 + r01**0.3)
        init.copy_(self.w0, www + 0.5 + zigzag * 2.5)
        init.copy_(self.a0, -0.19 + zigzag * 0.3 + linear * 0.4)
        if not self.is_first:
            init.copy_(self.v0, 0.73 - linear * 0.4)
        for name in ("w", "a", "g") if self.is_first else ("w", "a", "v", "g"):
            init.zeros_(getattr(self, f"{name}1"))
            _ortho(getattr(self, f"{name}2"), 0.1)
        init.copy_(self.k_k, 0.71 - linear * 0.1)
        init.constant_(self.k_a, 1.02)
        init.uniform_(self.receptance.weight, -0.5 / c**0.5, 0.5 / c**0.5)
        init.uniform_(self.key.weight, -0.05 / c**0.5, 0.05 / c**0.5)
        init.uniform_(self.value.weight, -0.5 / c**0.5, 0.5 / c**0.5)
        self._init_projections_and_norm()

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                wkv: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                v_first: torch.Tensor | None = None, segments: PackedSegments | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        bsz, t, _ = x.shape
        h, n = self.num_heads, self.head_size
        if self.variant == "x070":
            xx = token_shift(x, shift, segments) - x
            xr, xw, xk, xv, xa, xg = (x + xx * getattr(self, f"x_{m}") for m in "rwkvag")
        else:
            xr = xw = xk = xv = xa = xg = x
        r = self.receptance(xr)
        # x070: w = -softplus(-(w0 + lora)) - 0.5, decay = exp(-exp(w)); i.e. log decay below:
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        log_w = RWKV7_LOG_DECAY_MIN * torch.sigmoid(w.float())
        k = self.key(xk)
        if self.variant == "rad":
            if rope is None:
                raise ValueError(f"RAD-RWKV7 layer {self.layer_idx} needs the rotary position "
                                 "embeddings (cos, sin) of its positions")
            r, k = (rotate(z.view(bsz, t, h, n), rope).view(bsz, t, h * n) for z in (r, k))
        v = self.value(xv)
        if self.is_first:
            v_first = v
        else:
            if v_first is None:
                raise ValueError(f"RWKV-7 layer {self.layer_idx} needs v_first from the first "
                                 "converted layer")
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(bsz, t, h, n), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        if token_mask is not None:  # a padded step must not write into the state (left padding)
            v = v * token_mask.unsqueeze(-1).to(v.dtype)
        a4, r4, k4, v4 = (z.view(bsz, t, h, n) for z in (a, r, k, v))
        o, wkv = rwkv7_op(r4, log_w.view(bsz, t, h, n), k4, v4, -kk, kk * a4, wkv, self.kernel,
                          self.chunk_size, segments)
        o = head_norm(o, self.ln_x)
        if self.variant == "x070":
            bonus = (r4 * k4 * self.r_k).sum(dim=-1, keepdim=True) * v4
            o = o + bonus.reshape(bsz, t, h * n)
        return self.output(o * g), x[:, -1], wkv, v_first


class RWKV6ChannelMix(_RWKVModule):
    """x060 channel mix: sigmoid(receptance) * value(relu(key)^2)."""

    def __init__(self, hidden_size: int, intermediate_size: int, layer_idx: int, num_layers: int,
                 bias: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.layer_idx, self.num_layers = hidden_size, layer_idx, num_layers
        self.time_maa_k = nn.Parameter(torch.empty(hidden_size))
        self.time_maa_r = nn.Parameter(torch.empty(hidden_size))
        self.key = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.receptance = nn.Linear(hidden_size, hidden_size, bias=False)
        self.value = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self._on_meta():
            return
        _, r1a0 = _ratios(self.layer_idx, self.num_layers)
        ddd = torch.arange(self.hidden_size, dtype=torch.float64) / self.hidden_size
        init.copy_(self.time_maa_k, 1.0 - ddd.pow(r1a0))
        init.copy_(self.time_maa_r, 1.0 - ddd.pow(r1a0))
        _ortho(self.key.weight, 1.0)
        init.zeros_(self.receptance.weight)  # RWKV-LM zero-inits ffn.receptance and ffn.value
        init.zeros_(self.value.weight)
        for lin in (self.key, self.value):
            if lin.bias is not None:
                init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                segments: PackedSegments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xx = token_shift(x, shift, segments) - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k), x[:, -1]


class RWKV7ChannelMix(_RWKVModule):
    """x070 channel mix: value(relu(key)^2)."""

    def __init__(self, hidden_size: int, intermediate_size: int, layer_idx: int, num_layers: int,
                 bias: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.layer_idx, self.num_layers = hidden_size, layer_idx, num_layers
        self.x_k = nn.Parameter(torch.empty(hidden_size))
        self.key = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.value = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self._on_meta():
            return
        _, r1a0 = _ratios(self.layer_idx, self.num_layers)
        ddd = torch.arange(self.hidden_size, dtype=torch.float64) / self.hidden_size
        init.copy_(self.x_k, 1.0 - ddd.pow(r1a0**4))
        init.uniform_(self.key.weight, -0.5 / self.hidden_size**0.5, 0.5 / self.hidden_size**0.5)
        init.zeros_(self.value.weight)
        for lin in (self.key, self.value):
            if lin.bias is not None:
                init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                segments: PackedSegments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xx = token_shift(x, shift, segments) - x
        return self.value(torch.relu(self.key(x + xx * self.x_k)) ** 2), x[:, -1]


RWKV_MODULES = (RWKV6TimeMix, RWKV7TimeMix, RWKV6ChannelMix, RWKV7ChannelMix)
