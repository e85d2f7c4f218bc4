"""Input checks shared by every op. They run once, at the Python boundary, and raise
``ValueError``/``TypeError`` naming the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim: int | Sequence[int], *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_int_tensor(name: str, t: object, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def check_same(what: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """All tensors in ``others`` share ``ref``'s device (what='device') or dtype."""
    want = getattr(ref, what)
    for name, t in others.items():
        if t is not None and getattr(t, what) != want:
            raise (ValueError if what == "device" else TypeError)(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}"
                if what == "device"
                else f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}"
            )


def check_size(name: str, t: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] must equal {meaning} ({expected}), got shape {tuple(t.shape)}"
        )


def is_meta_or_fake(t: torch.Tensor) -> bool:
    """True when values cannot be inspected (meta device or a FakeTensor under tracing)."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def value_checks_allowed(t: torch.Tensor) -> bool:
    """Value-dependent checks (index ranges, tau > 0) cost a host sync on accelerators and
    are impossible under tracing; we do them only for eager CPU tensors."""
    # is_compiling() first: is_fake() on a traced tensor breaks torch.compile(fullgraph=True).
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" and not is_meta_or_fake(t)


def check_int(name: str, x: object, lo: int | None = None) -> int:
    """``x`` is a Python int (not a bool), ``>= lo`` when ``lo`` is given."""
    if not isinstance(x, int) or isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return x


def check_rope_kv(key: torch.Tensor, value: torch.Tensor, inv_freq: object) -> int:
    """In-place RoPE edits of a K/V cache: an even head dim (key's last dim), unit-stride
    last dims of key and value, ``inv_freq`` a 1-D float (D/2,). Returns the head dim D."""
    d = key.shape[-1]
    if d % 2:
        raise ValueError(f"key.shape[{key.dim() - 1}] (head dim) must be even for RoPE, got {d}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value must have a unit-stride last dim (edited in place)")
    check_tensor("inv_freq", inv_freq, 1)
    if inv_freq.shape[0] != d // 2:
        raise ValueError(f"inv_freq must be (D/2 = {d // 2},), got {tuple(inv_freq.shape)}")
    return d
