"""The one tolerance table and the comparison helper that every kernel test and numerical check uses, and the
measure of activation memory the fused layers are held to (:func:`saved_for_backward_bytes`).

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

    ``dtype`` defaults to ``actual.dtype``. NaN must be NaN and +-inf the same infinity where the reference has
    them; the scale of ``atol`` is the largest finite magnitude. Raises AssertionError naming ``name`` and the
    worst element.
    """
    dtype = dtype or actual.dtype
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    tol = tolerance(dtype, tf32=tf32)
    ref = reference.detach().to(torch.float64).cpu()
    got = actual.detach().to(torch.float64).cpu()
    finite = ref[ref.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(got, ref, atol=tol.atol * scale, rtol=tol.rtol, equal_nan=True,
                               msg=lambda m: f"{name} ({dtype}, tol {tol}, scale {scale:.3g}): {m}")


def check_against_reference(fn, ref_fn, inputs, *, tf32: bool = False, grad_output=None):
    """Compare ``fn(*inputs)`` and every input gradient with ``ref_fn`` run on float64 copies of the inputs.

    ``inputs`` are tensors (or None, passed through); floating tensors that require grad get their gradients
    compared too. Both sides are back-propagated with the same random ``grad_output`` (drawn from the global
    RNG when not given). Returns the output of ``fn``.
    """
    def upcast(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(torch.float64).requires_grad_(t.requires_grad)

    ref_inputs = [upcast(t) for t in inputs]
    out = fn(*inputs)
    ref = ref_fn(*ref_inputs)
    assert_close(out, ref, dtype=out.dtype, tf32=tf32, name="output")
    if not out.requires_grad:
        return out
    if grad_output is None:
        grad_output = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    out.backward(grad_output)
    ref.backward(grad_output.to(torch.float64))
    for i, (t, r) in enumerate(zip(inputs, ref_inputs)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            if t.grad is None:
                raise AssertionError(f"input {i} {tuple(t.shape)}: no gradient")
            assert_close(t.grad, r.grad, dtype=t.dtype, tf32=tf32, name=f"grad of input {i} {tuple(t.shape)}")
    return out


def saved_for_backward_bytes(fn) -> int:
    """The bytes autograd keeps for the backward while ``fn()`` runs: the storages of the saved tensors, each
    counted once (a view and its base, or a tensor two nodes save, are one)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
