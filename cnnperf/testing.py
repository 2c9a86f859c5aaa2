"""The one tolerance table and the comparison helper that every kernel test and numerical check uses.

A result computed in ``dtype`` is compared with the float64 reference computed from the *same* (already
rounded) inputs, so the table only has to cover the kernel's own rounding: accumulation in fp32 and the final
store in ``dtype``. ``atol`` is relative to the largest magnitude in the reference, so that one table fits
small and large values alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float  # times max(1, max |reference|)
    rtol: float


# fp32: fp32 accumulation error over long reductions. tf32: 10-bit mantissa inputs inside the matmul.
# fp16 / bf16: one rounding of the fp32 result to an 11-bit / 8-bit mantissa, plus accumulation order.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-10, rtol=1e-10),
    "float32": Tolerance(atol=2e-5, rtol=2e-5),
    "tf32": Tolerance(atol=5e-3, rtol=5e-3),
    "float16": Tolerance(atol=2e-3, rtol=2e-3),
    "bfloat16": Tolerance(atol=1.6e-2, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype, *, tf32: bool = False) -> Tolerance:
    """The table's row for results computed in ``dtype`` (``tf32=True`` for fp32 with TF32 matmuls)."""
    name = str(dtype).removeprefix("torch.")
    if tf32 and name == "float32":
        name = "tf32"
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype}; the table has {sorted(TOLERANCES)}")
    return TOLERANCES[name]


def assert_close(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | None = None, *,
                 tf32: bool = False, name: str = "output") -> None:
    """Assert ``actual`` matches the float64 ``reference`` within the table's row for ``dtype``.

    ``dtype`` defaults to ``actual.dtype``. Raises AssertionError naming ``name`` and the worst element.
    """
    dtype = dtype or actual.dtype
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    tol = tolerance(dtype, tf32=tf32)
    ref = reference.detach().to(torch.float64).cpu()
    got = actual.detach().to(torch.float64).cpu()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, atol=tol.atol * scale, rtol=tol.rtol,
                               msg=lambda m: f"{name} ({dtype}, tol {tol}, scale {scale:.3g}): {m}")
