"""Build a model without allocating it, then allocate each tensor once, in its final dtype, as its data arrives.

Why: loading used to build the model in fp32 (random init included), read every tensor of the
checkpoint, then copy: about three sizes of the model at the peak, and always fp32. Here the model
is built on PyTorch's ``meta`` device (shapes only: constructors and init cost nothing), cast there
to the load dtype (:func:`empty_model`), and each parameter or buffer is allocated on the target
device the moment its tensor is copied in (:class:`Filler`): the process holds the weights once,
plus the tensor being copied.

Dtype policy (:func:`cast_on_meta`): every floating parameter and buffer takes the load dtype,
except routers (gate weights, bias buffers), which stay fp32 because router math is fp32 whatever
the model's dtype (they are E×D numbers a layer), LoRA adapters (what training updates), and RoPE
frequencies (recomputed in fp32).

Buffers that checkpoints do not store (``persistent=False``, RoPE's ``inv_freq``) are allocated at
the end and recomputed by their module's ``reset_buffers()``; a module holding such a buffer
without that method is refused by name rather than left holding uninitialised memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain
from typing import TypeVar

import torch
from torch import Tensor, nn

from moelab.errors import UserError
from moelab.model.memory_guard import require_fits
from moelab.moe.routers.base import Router

M = TypeVar("M", bound=nn.Module)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (model, module path, module) once every tensor a module holds itself is in: e.g. quantize it and drop the source
ModuleLoaded = Callable[[nn.Module, str, nn.Module], None]


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or such a torch dtype) → torch dtype; None stays None (the source's)."""
    if value is None or (isinstance(value, torch.dtype) and value in DTYPES.values()):
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise UserError(f"dtype {value!r} is invalid: use one of {', '.join(DTYPES)}")


def load_dtype(asked: str | torch.dtype | None, stored: torch.dtype | None) -> torch.dtype:
    """The dtype to load in: ``asked`` if given, else the stored weights' (``stored``, e.g.
    :meth:`~moelab.safetensors_reader.SafetensorsReader.float_dtype`), else fp32; a stored dtype
    moelab does not compute in (fp64, fp8) loads as fp32."""
    dtype = parse_dtype(asked)
    if dtype is not None:
        return dtype
    return stored if stored in DTYPES.values() else torch.float32  # type: ignore[return-value]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"`` (the CLI's spelling; other dtypes as torch prints them)."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def cast_on_meta(model: M, dtype: torch.dtype) -> M:
    """Floating parameters and buffers to ``dtype``, routers back to fp32 (see the module doc); free on meta."""
    model.to(dtype)
    for mod in model.modules():
        if isinstance(mod, Router) or getattr(mod, "KEEP_FP32", False):  # LoRA adapters: moelab.nn.low_rank
            mod.float()
    return model


def empty_model(build: Callable[[], M], dtype: torch.dtype, device: str | torch.device = "cpu") -> M:
    """``build()`` run on the meta device, checked against the free memory of ``device`` at ``dtype``'s size
    (:func:`~moelab.model.memory_guard.require_fits`), and cast to ``dtype``; nothing is allocated yet."""
    with torch.device("meta"):
        model = build()
    require_fits(model.cfg, device, dtype)  # type: ignore[arg-type]
    return cast_on_meta(model, dtype)


class Filler:
    """Allocates each tensor of a meta-built model on its first :meth:`fill` and copies the data in.

    Names are ``state_dict`` names. Tied tensors (one Parameter under several names, e.g. a tied LM
    head) are allocated once and set under every name. ``on_module_loaded`` is called for each
    module once every tensor it holds itself is in (aliases count as in), so a caller can replace
    it, e.g. by a quantized copy, before the next module is read; the filler keeps no reference to a
    finished module, so a replaced one is freed at once. Use :meth:`fill`, or :meth:`allocate`, write
    into the returned tensor, then :meth:`loaded`.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        where: str = "the checkpoint",
        on_module_loaded: ModuleLoaded | None = None,
    ) -> None:
        self.model, self.device, self.where = model, torch.device(device), where
        self.on_module_loaded = on_module_loaded
        self._slots: dict[str, tuple[str, nn.Module, str, bool]] = {}  # name → (module path, module, attr, is a parameter)
        by_tensor: dict[int, list[str]] = {}
        self._pending: dict[str, int] = {}
        self._names_of: dict[str, list[str]] = {}  # module path → its own names
        for path, mod in model.named_modules(remove_duplicate=False):
            persistent = [(a, t, False) for a, t in mod._buffers.items() if a not in mod._non_persistent_buffers_set]
            for attr, t, is_param in chain(((a, t, True) for a, t in mod._parameters.items()), persistent):
                if t is None:
                    continue
                name = f"{path}.{attr}" if path else attr
                self._slots[name] = (path, mod, attr, is_param)
                by_tensor.setdefault(id(t), []).append(name)
                self._pending[path] = self._pending.get(path, 0) + 1
                self._names_of.setdefault(path, []).append(name)
        self._aliases = {n: names for names in by_tensor.values() for n in names}
        self._all = list(self._slots)
        self._filled: set[str] = set()

    # ------------------------------------------------------------------ what the model needs
    def names(self) -> list[str]:
        """Every ``state_dict`` name the model needs, tied aliases included."""
        return list(self._all)

    def groups(self) -> list[list[str]]:
        """Names sharing one tensor (a single name for an untied tensor); one of each group must be filled."""
        seen: set[int] = set()
        out = []
        for names in self._aliases.values():
            if id(names) not in seen:
                seen.add(id(names))
                out.append(names)
        return out

    def is_filled(self, name: str) -> bool:
        return name in self._filled

    # ------------------------------------------------------------------ filling
    def allocate(self, name: str) -> Tensor:
        """Allocate ``name`` (and its tied aliases) in its meta dtype on the device, uninitialised; return
        the tensor to write into, then call :meth:`loaded`."""
        if name in self._filled:
            raise AssertionError(f"{name} is filled twice")
        _path, mod, attr, is_param = self._slots[name]
        old = (mod._parameters if is_param else mod._buffers)[attr]
        new = torch.empty(old.shape, dtype=old.dtype, device=self.device)
        value: Tensor = nn.Parameter(new, requires_grad=old.requires_grad) if is_param else new
        for alias in self._aliases[name]:
            _, a_mod, a_attr, a_param = self._slots[alias]
            (a_mod._parameters if a_param else a_mod._buffers)[a_attr] = value
        return new

    def loaded(self, name: str) -> None:
        """``name`` (allocated and written) is in: tell ``on_module_loaded`` of the modules now complete."""
        done = []
        for alias in self._aliases[name]:
            a_path, a_mod, _, _ = self._slots[alias]
            self._filled.add(alias)
            self._pending[a_path] -= 1
            if self._pending[a_path] == 0:
                done.append((a_path, a_mod))
        for a_path, a_mod in done:
            for n in self._names_of[a_path]:  # forget the finished module: a hook that replaces it frees it
                del self._slots[n]
            if self.on_module_loaded is not None:
                self.on_module_loaded(self.model, a_path, a_mod)

    @torch.no_grad()
    def fill(self, name: str, tensor: Tensor) -> None:
        """Allocate ``name`` (and its aliases) and copy ``tensor`` in, converting it to the model's dtype."""
        dst = self.allocate(name)
        if tuple(tensor.shape) != tuple(dst.shape):
            raise UserError(
                f"{self.where}: tensor {name!r} has shape {list(tensor.shape)} but the model's config needs "
                f"{list(dst.shape)}"
            )
        dst.copy_(tensor)
        self.loaded(name)

    def finish(self) -> None:
        """Allocate and recompute the buffers checkpoints do not store; refuse a tensor left unloaded."""
        missing = [n for n in self._all if n not in self._filled]
        if missing:
            raise UserError(f"{self.where} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:8])}")
        for path, mod in self.model.named_modules():
            volatile = [b for b in mod._non_persistent_buffers_set if mod._buffers.get(b) is not None]
            if not volatile:
                continue
            reset = getattr(mod, "reset_buffers", None)
            if reset is None:
                raise TypeError(
                    f"{type(mod).__name__} at {path!r} holds buffers checkpoints do not store ({', '.join(volatile)}) "
                    "and has no reset_buffers() to recompute them: it cannot be loaded from the meta device"
                )
            for b in volatile:
                mod._buffers[b] = torch.empty_like(mod._buffers[b], device=self.device)
            reset()
        left = [n for n, t in chain(self.model.named_parameters(), self.model.named_buffers()) if t.is_meta]
        if left:
            raise AssertionError(f"tensors left on the meta device after loading: {left[:8]}")


def fill_by_names(
    filler: Filler, tensors: Mapping[str, Tensor], order: list[str] | None = None, consume: bool = False
) -> None:
    """Copy every tensor of ``tensors`` (a :class:`~moelab.safetensors_reader.SafetensorsReader` or a dict)
    into the parameter or buffer of the same name, in ``order`` (default: the mapping's), then :meth:`Filler.finish`.
    ``consume`` (``tensors`` a dict): drop each tensor from it once copied, so a source held only by the
    dict is freed as the model fills: one model's size at the peak, not two.

    Names are checked before anything is read: a tensor the model lacks, or a tensor (group of tied
    names) the file lacks, is one UserError listing them. A tied tensor stored under two names is read once.
    """
    names = set(tensors)
    unexpected = sorted(names - set(filler.names()))
    missing = [g[0] for g in filler.groups() if not any(n in names for n in g)]
    if missing or unexpected:
        raise UserError(f"{filler.where} does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name in order if order is not None else list(tensors):
        if not filler.is_filled(name):
            filler.fill(name, tensors[name])
        if consume:
            del tensors[name]  # type: ignore[attr-defined]
    filler.finish()


__all__ = [
    "DTYPES",
    "Filler",
    "ModuleLoaded",
    "cast_on_meta",
    "dtype_name",
    "empty_model",
    "fill_by_names",
    "load_dtype",
    "parse_dtype",
]
