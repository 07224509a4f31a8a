"""Counting the operations that make the host wait for the device.

On CUDA, reading a value computed on the GPU (``.item()``, ``bool(t)``, ``float(t)``,
``.tolist()``, ``.cpu()``) or running an op whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``unique``) blocks Python until the GPU has drained
its queue; the kernels Python would have launched meanwhile are late, and the GPU idles.
The same calls exist on the CPU, where they cost nothing, so they can be counted there:

    with SyncCounter() as syncs:
        trainer_step()
    assert syncs.count <= 3, syncs.report()

Two hooks see them. A ``TorchFunctionMode`` catches the Python-level reads (whose CPU
versions dispatch nothing: ``.tolist()`` of a CPU tensor copies no data); a
``TorchDispatchMode`` catches the data-dependent aten ops, including those a composite op
reaches (``bool(t)`` becomes ``aten._local_scalar_dense``). A dispatch-level op reached
from a counted Python-level read is not counted twice.

Everything inside the block counts, host-made tensors included: code under test keeps
its host arithmetic (lengths, offsets) in Python numbers or does it before the block,
where the tokens are made, which is where a GPU run needs it anyway.

A custom operator (``torch.library``) is opaque: its implementation runs below both
hooks. The counter lists the ones it saw in ``opaque``, so that a test can run their
implementations directly under a counter of its own (tests/test_syncs.py does the
InfoNCE op's chunked forward and backward).
"""

from __future__ import annotations

import collections
import os
import sys
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output size or value must be known on the host before the next op is launched.
SYNCING_OPS = {
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.nonzero,
    aten.nonzero_static,
    aten.argwhere,
    aten.masked_select,
    aten.equal,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}
# Python-level reads of a tensor's data into host memory.
READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


def _is_syncing(func, args) -> bool:
    if func.overloadpacket in SYNCING_OPS or func in SYNCING_OPS:
        return True
    if func.overloadpacket is aten.repeat_interleave:
        # Without output_size, the output length is the sum of the repeats.
        return isinstance(args[0], torch.Tensor) and "output_size" not in func._schema.name
    if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
        # A boolean index becomes integer indices through nonzero inside the kernel.
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


class SyncCounter:
    """Counts the device->host synchronisations of the code run inside ``with``; see the
    module docstring. ``count`` is their number, ``by_op`` how many of each, and
    ``report()`` says where the first of each came from."""

    def __init__(self) -> None:
        self.by_op: collections.Counter[str] = collections.Counter()
        self.first_seen: dict[str, str] = {}
        self.opaque: set[str] = set()
        self._depth = 0
        counter = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                read = func in READS or _blocking_copy(func, args, kwargs)
                if read and counter._depth == 0:
                    counter._record(getattr(func, "__name__", str(func)))
                if read:
                    counter._depth += 1
                try:
                    return func(*args, **kwargs)
                finally:
                    if read:
                        counter._depth -= 1

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace not in ("aten", "prims"):
                    counter.opaque.add(str(func.overloadpacket))
                if counter._depth == 0 and _is_syncing(func, args):
                    counter._record(str(func.overloadpacket.__name__))
                return func(*args, **(kwargs or {}))

        self._modes = (_Functions(), _Dispatch())

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def _record(self, name: str) -> None:
        self.by_op[name] += 1
        if name not in self.first_seen:
            stack = traceback.extract_stack()
            ours = [f for f in stack if f.filename != __file__ and "/torch/" not in f.filename]
            frame = (ours or stack)[-1]
            self.first_seen[name] = f"{frame.filename}:{frame.lineno} ({frame.name})"

    def report(self) -> str:
        """One line per op: how many times, and where the first came from."""
        return (
            "; ".join(
                f"{name} x{n} (first at {self.first_seen[name]})" for name, n in self.by_op.items()
            )
            or "no synchronisation"
        )

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc_info)


def _called_by_torch() -> bool:
    """Whether the Python frame that called into the mode is torch's own code."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename


def _blocking_copy(func, args, kwargs) -> bool:
    """Whether ``func`` copies between host and device without ``non_blocking``: a
    ``Tensor.to`` naming a device, or a tensor made from Python values with a ``device``.
    On CUDA either waits for the device: a copy to the host for the data, a copy from
    pageable host memory for the stream. On the CPU the two devices are one, so any such
    call in our code counts (a copy to where the tensor already is costs nothing with
    ``non_blocking=True``); torch's own moves are to the device a tensor is on already
    (``clip_grad_norm_`` gathering per-tensor norms) and are left out."""
    if func in (torch.tensor, torch.as_tensor):
        return kwargs.get("device") is not None
    if func is not torch.Tensor.to or kwargs.get("non_blocking") or _called_by_torch():
        return False
    if len(args) > 2 and isinstance(args[2], bool) and args[2]:  # .to(device, non_blocking)
        return False
    return any(
        isinstance(value, str | torch.device)
        or (isinstance(value, torch.Tensor) and value is not args[0])
        for value in (*args[1:2], kwargs.get("device"))
    )
