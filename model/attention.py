"""Self-attention over packed tokens: which kernel computes it.

Shapes: T = tokens, A = heads, Dh = head size, B = batch, L = padded length. Every kernel
takes the packed output of the fused projection, qkv [T, 3, A, Dh], and the batch's
:class:`~biencoder.model.bert.Packing`, and returns the packed output [T, A, Dh]; row b's
tokens, ``packing.offsets[b]:offsets[b + 1]``, attend to each other only; with a
``window`` (ModernBERT's local layers, Mistral's sliding window), only to those at most
``window`` positions away; ``causal`` (decoders), only to themselves and earlier ones.

- ``"padded"``: scatter into [B, L], masked SDPA, gather back. Runs anywhere, with any
  dtype and attention dropout; it spends the scatter, the gather and the L² scores of
  every row on padding.
- ``"varlen"``: PyTorch's variable-length flash kernel on the packed tokens. CUDA only,
  fp16/bf16 only, no attention dropout.
- ``"nested"``: SDPA over jagged nested tensors. Runs on the CPU (torch's math kernel,
  forward and backward), so it is the packed path the CPU tests compare with the padded
  one; on CUDA torch's fused jagged kernels take it (only the GPU tests check that). No
  window: jagged SDPA takes no mask; and not causal, which its CPU kernel refuses.
  FlexAttention with a document mask, the other CPU candidate, has no CPU backward.
- ``"auto"``: ``"varlen"`` where it can run, else ``"padded"``.

Our code reads no value back from the device: the offsets and the longest row's length
come from the host with the packing. (torch's CPU fallback for ``"nested"`` splits the
rows by their lengths on the host, which on a CPU waits for nothing.)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from biencoder.model.bert import Packing

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None
# Its keywords change between releases: only those a call needs are passed.
_VARLEN_PARAMETERS = inspect.signature(varlen_attn).parameters if varlen_attn else {}

Kernel = Callable[..., torch.Tensor]
HALF = (torch.float16, torch.bfloat16)


def band_mask(keys: torch.Tensor, window: int | None, causal: bool = False) -> torch.Tensor:
    """Where a query may attend a key, [B, 1, L, L], from the key mask ``keys`` [B, 1, 1, L]:
    at most ``window`` positions away (None: any distance), not after the query where
    ``causal``, and either a real key or the query itself. A padding query's band can hold
    no real key (a local layer's far from the text, a causal one's left of a left-padded
    text), and SDPA gives NaN for a row with nothing to attend, which the zero weights of
    masked keys would carry into the real rows (NaN·0 is NaN); its own position keeps the
    row finite."""
    index = torch.arange(keys.shape[-1], device=keys.device)
    distance = index[:, None] - index[None, :]  # [L, L]: query minus key
    band = torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        band = distance.abs() <= window
    if causal:
        band = band & (distance >= 0)
    return (band & keys) | (distance == 0)


def padded(
    qkv: torch.Tensor,
    packing: Packing,
    dropout: float = 0.0,
    window: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """[T, 3, A, Dh] -> [T, A, Dh] through the padded layout and a key mask."""
    B, L = packing.batch, packing.length
    A, Dh = qkv.shape[2:]
    # One scatter of the fused projection, zeros at padding (see Packing.unpack): a NaN
    # in a padded query row would reach the keys' gradients through its (discarded) scores.
    padded_qkv = packing.unpack(qkv.flatten(1))  # [B, L, 3H]
    # Strided views: SDPA's CPU kernel reads them without a copy.
    q, k, v = padded_qkv.view(B, L, 3, A, Dh).permute(2, 0, 3, 1, 4)  # [B, A, L, Dh] each
    # True where a key may be attended; [B, 1, 1, L] broadcasts over heads and queries.
    # Rebuilt from the padding positions each layer: B·L booleans against the L² scores.
    attend = torch.ones(B * L, dtype=torch.bool, device=qkv.device)
    attend = attend.index_fill_(0, packing.padding, False).view(B, 1, 1, L)
    if window is not None or causal:
        attend = band_mask(attend, window, causal)  # [B, 1, L, L]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
    return packing.pack(y.transpose(1, 2))  # [T, A, Dh]


def varlen(
    qkv: torch.Tensor,
    packing: Packing,
    dropout: float = 0.0,
    window: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """[T, 3, A, Dh] -> [T, A, Dh] with the variable-length flash kernel."""
    if varlen_attn is None:
        raise RuntimeError("attention='varlen' needs torch.nn.attention.varlen (torch >= 2.9)")
    if dropout > 0:
        # The kernel hard-codes a dropout of 0: running it would silently train without.
        raise ValueError(
            f"attention='varlen' has no attention dropout (got {dropout}); use 'auto', "
            "which falls back to 'padded', or set the attention dropout to 0"
        )
    offsets = packing.offsets  # [B + 1] int32, as the kernel wants it
    # unbind, not three slices: its backward stacks the three gradients into one
    # [T, 3, A, Dh] buffer instead of summing three zero-padded copies of it.
    q, k, v = qkv.unbind(1)  # [T, A, Dh] each
    if window is None and not causal:
        # No window argument: torch releases before 2.13 (the device image has 2.11) may
        # not take one, and BERT's global attention needs none.
        return varlen_attn(q, k, v, offsets, offsets, packing.longest, packing.longest)
    # Flash's window counts the positions seen on each side, as ours does; -1 is no limit,
    # and a right side of 0 is causal.
    left = -1 if window is None else window
    right = 0 if causal else left
    if causal and "is_causal" in _VARLEN_PARAMETERS:
        # Releases that take is_causal (torch 2.13 has none: the window says it).
        options = {"is_causal": True}
        if window is not None:
            options["window_size"] = (left, right)
    else:
        options = {"window_size": (left, right)}
    return varlen_attn(q, k, v, offsets, offsets, packing.longest, packing.longest, **options)


def nested(
    qkv: torch.Tensor,
    packing: Packing,
    dropout: float = 0.0,
    window: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """[T, 3, A, Dh] -> [T, A, Dh] with SDPA over jagged nested tensors."""
    if window is not None:
        raise ValueError(
            "attention='nested' has no sliding window, which ModernBERT's local layers "
            "and Mistral's sliding window need; use 'auto', 'padded' or 'varlen'"
        )
    if causal:
        raise ValueError(
            "attention='nested' has no causal mask (torch's jagged SDPA refuses is_causal on "
            "the CPU), which a decoder needs unless loaded with bidirectional=True; use "
            "'auto', 'padded' or 'varlen'"
        )

    def jagged(t: torch.Tensor) -> torch.Tensor:
        # The jagged SDPA wants each of q, k, v contiguous as [T, A, Dh], not a strided
        # view of the fused projection. Both lengths are given, else torch computes them
        # from the offsets, reading them back from the device: the longest row from the
        # packing; 1 is a lower bound (a text has its [CLS]) that torch only checks to
        # keep empty rows off its fused kernels.
        nt = torch.nested.nested_tensor_from_jagged(
            t.contiguous(), offsets=packing.offsets, min_seqlen=1, max_seqlen=packing.longest
        )
        return nt.transpose(1, 2)  # [B, A, j, Dh]

    q, k, v = qkv.unbind(1)  # [T, A, Dh] each
    y = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), dropout_p=dropout)
    return y.transpose(1, 2).values()  # [T, A, Dh]


KERNELS: dict[str, Kernel] = {"padded": padded, "varlen": varlen, "nested": nested}
CHOICES = ("auto", *KERNELS)


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    # The flash kernels start at Ampere. Cached: a device's capability does not change,
    # and asking the driver every layer would be a host call per layer for nothing.
    return torch.cuda.get_device_capability(device)[0] >= 8


def varlen_fits(qkv: torch.Tensor, dropout: float) -> bool:
    """Whether ``"varlen"`` can run on this projection [T, 3, A, Dh] with this dropout;
    read off metadata only (device, dtype, shape), so no synchronisation."""
    head = qkv.shape[-1]
    return (
        varlen_attn is not None
        and qkv.is_cuda
        and qkv.dtype in HALF
        and dropout == 0
        and head % 8 == 0
        and head <= 256
        and _flash_capable(qkv.device)
    )


def resolve(name: str, qkv: torch.Tensor, dropout: float) -> str:
    """The kernel that ``name`` runs on the projection ``qkv`` [T, 3, A, Dh]: ``"auto"``
    resolved (under autocast on a GPU the projection is already bf16)."""
    if name == "auto":
        return "varlen" if varlen_fits(qkv, dropout) else "padded"
    if name not in KERNELS:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(CHOICES)}")
    return name


def attend(
    name: str,
    qkv: torch.Tensor,
    packing: Packing,
    dropout: float = 0.0,
    window: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention within each packed row with the kernel ``name`` (one of :data:`CHOICES`),
    within ``window`` positions where one is given, to earlier tokens only where
    ``causal``: [T, 3, A, Dh] -> [T, A, Dh]."""
    # Looked up at call time, not bound at import, so a test can swap a kernel in KERNELS.
    return KERNELS[resolve(name, qkv, dropout)](qkv, packing, dropout, window, causal)
