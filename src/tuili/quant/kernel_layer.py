"""What every quantized linear layer shares: its product as a cached `KernelCall`, run by tuili's
kernels for small batches and by its PyTorch path otherwise, and the compute dtype that picks
which call (fp32 or 16-bit activations)."""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tuili.kernels import ops as kernels
from tuili.kernels.contract import KernelCall

COMPUTE_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("tuili_compute_dtype", default=None)


@contextmanager
def compute_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block (the calls made in it, like `torch.autocast`: a context variable, so another
    thread's work is unaffected), weight-only layers compute with 16-bit activations, fp32 accumulation:
    large batches (prefill) as a bf16 GEMM on dequantized weights (oneDNN), small ones (decoding)
    in tuili's dot-product kernels (W4 × bf16 activations; W8 × int16 activations rounded per
    token, which is finer than bf16 and 1.5-2× faster there); about 3× faster than fp32 at
    prefill and at 16 rows on CPUs with AVX512-BF16 or AMX. The engine uses it there. None: the
    activations' dtype (fp32 in, exact fp32 products)."""
    token = COMPUTE_DTYPE.set(dtype)
    try:
        yield
    finally:
        COMPUTE_DTYPE.reset(token)


_UNSET = object()
_CALL_KEYS = ("_kernel_call", "_bf16_kernel_call")  # where a layer caches its call, by bf16
PACKED = "_packed"  # where a layer that holds its weights only in a kernel's packing keeps that call


class KernelLinear(nn.Module, ABC):
    """A quantized linear layer whose forward calls one of tuili's kernels for small batches and its
    PyTorch path (`_reference`) otherwise. Decoding calls every layer once per token, so the call
    is kept short: the layer's `KernelCall` sits in a plain attribute, dropped whenever a buffer is
    assigned, loaded or moved, instead of being rebuilt through nn.Module each time."""

    _buffer_names: tuple[str, ...] = ()
    _row_layout: tuple[str, ...] = ()  # the buffers a kernel's packing replaces (`_keep_only`)
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def kernel_call(self, bf16: bool = False) -> KernelCall | None:
        """The kernel call of this layer's product for fp32 activations (`bf16`: for 16-bit ones, a
        bf16 input or inside `compute_dtype(torch.bfloat16)`); None where no kernel takes its
        layout or its weights are not on the CPU."""
        key = _CALL_KEYS[bf16]
        call = self.__dict__.get(key, _UNSET)
        if call is _UNSET:
            on_cpu = all(t.device.type == "cpu" for t in self.buffers() if not t.is_meta)  # meta: packed away
            made = (self._make_bf16_kernel_call() if bf16 else self._make_kernel_call()) if on_cpu else None
            call = self.__dict__[key] = made
        return call  # type: ignore[return-value]

    @abstractmethod
    def _make_kernel_call(self) -> KernelCall | None:
        """The call for fp32 activations, or None where no kernel applies."""

    def _make_bf16_kernel_call(self) -> KernelCall | None:
        """The call for 16-bit activations: by default the same as for fp32 ones."""
        return self.kernel_call()

    @abstractmethod
    def _reference(self, rows: Tensor) -> Tensor:
        """The PyTorch product for rows (M, in) without bias: the fallback and large batches."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        order = self._buffers.get("input_order")  # a dict lookup: this runs for every layer, every step
        if order is not None:  # the codes' columns are the inputs in this order
            rows = rows.index_select(1, order)
        ext = kernels.extension()
        call = None
        if ext is not None:  # no kernels, or forced off (tests, export): nothing is packed or cached
            bf16 = rows.dtype == torch.bfloat16 or COMPUTE_DTYPE.get() == torch.bfloat16
            call = self.__dict__.get(_CALL_KEYS[bf16], _UNSET)
            if call is _UNSET:
                call = self.kernel_call(bf16)
        y = call.run(ext, rows) if call is not None and rows.shape[0] <= call.max_rows else self._reference(rows)
        bias = self.bias if call is None else call.bias
        if bias is not None:
            y = y + bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def __setattr__(self, name, value):
        if name in self._row_layout and PACKED in self.__dict__:
            self.unpack_()
        if name in self._buffer_names:
            self._forget_kernel_calls()
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name in self._row_layout and PACKED in self.__dict__:  # a reader of the row layout
            self.unpack_()
        return super().__getattr__(name)

    def _forget_kernel_calls(self) -> None:
        for key in _CALL_KEYS:
            self.__dict__.pop(key, None)

    # One copy of the weights: a layer whose kernel takes every batch size holds its weights only
    # in that kernel's packing. The row-layout buffers become meta tensors that keep only their
    # shapes and dtypes (what analysis reports); reading one (saving, export, `.to`) puts the row
    # layout back in place of the packing, and the next kernel call packs it again.

    def _keep_only(self, call: KernelCall) -> None:
        """Hold the weights only in `call`'s packing: the row-layout buffers become meta tensors
        (assigned past __setattr__, which would forget the calls), the fp32 call that read them goes."""
        for name in self._row_layout:
            t = self._buffers[name]
            if t is not None:
                self._buffers[name] = t.to("meta")
        self.__dict__[PACKED] = call
        self.__dict__.pop("_kernel_call", None)

    def packed_call(self) -> KernelCall | None:
        """The call whose packing holds this layer's weights, None where the row layout holds them."""
        return self.__dict__.get(PACKED)

    def unpack_(self) -> None:
        """Put the row layout back in place of the packing (a no-op where it is there)."""
        call = self.__dict__.get(PACKED)
        if call is None:
            return
        rows = self._unpacked(call)
        del self.__dict__[PACKED]
        for name, t in rows.items():
            if self._buffers[name] is not None:
                self._buffers[name] = t
        self._forget_kernel_calls()

    @abstractmethod
    def _unpacked(self, call: KernelCall) -> dict[str, Tensor]:
        """The row-layout buffers made back from `call`'s packing (what `_keep_only` replaced)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not keep_vars:  # a state dict of values (saving, copying); keep_vars: introspection
            self.unpack_()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _own_layout(self) -> None:
        """Put the buffers back in the layout they are loaded into and moved in."""
        self.unpack_()

    def _load_from_state_dict(self, *args, **kwargs):
        self._own_layout()
        self._forget_kernel_calls()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):
        self._own_layout()
        self._forget_kernel_calls()
        return super()._apply(*args, **kwargs)
