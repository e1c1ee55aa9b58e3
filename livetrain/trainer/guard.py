"""The NaN guard: a non-finite update never reaches the weights, and on the steps that do
not log the guard reads nothing on the host.

Every update's gradients are checked on the device: one multi-tensor kernel (the one
GradScaler uses) raises a flag on the device when any gradient holds a NaN or an
infinity. A non-finite loss always gives non-finite gradients, so the flag covers both.
What then keeps the update from the weights depends on the mode:

- `"device"`: nothing is read on the host. The flag is sticky, and the update is
  refused on the device: the fused kernels of Adam, AdamW and SGD take it as their
  `found_inf` (as under GradScaler) and skip the update, step count included; any
  other optimizer gets its gradients zeroed on the device (one op per parameter
  tensor). Every update after the first non-finite one is refused the same way until
  the next log reads the flag: the run then pauses and offers the rollback.
- `"exact"`: the flag is read at every update (one host read, a device sync on a GPU)
  and a non-finite update's gradients are dropped before any optimizer sees them: the
  run pauses at that very step.
- `"auto"` (the default): `"device"` where the optimizer can skip on the device:
  Adam, AdamW and SGD left to torch's choice of implementation are switched to their
  fused kernel (the same arithmetic, one kernel for the whole update), which takes the
  flag. Elsewhere, `"exact"` on the CPU (a CPU tensor's read waits for nothing) and
  `"device"` on an accelerator.

Sparse gradients (`nn.Embedding(sparse=True)`) are always guarded exactly: they can be
neither fused nor zeroed in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NAN_GUARDS = ("auto", "device", "exact")
FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def fused_devices() -> set[str]:
    """The device types with fused Adam/AdamW/SGD kernels in this torch (CUDA only before
    torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return {"cuda"}
    return set(_get_fused_kernels_supported_devices())


def runs_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group runs a fused kernel that takes `found_inf`."""
    return type(optimizer) in FUSABLE and all(group.get("fused")
                                              for group in optimizer.param_groups)


def can_fuse(optimizer: torch.optim.Optimizer, sparse: set[int]) -> bool:
    """Whether torch was left to choose this optimizer's implementation and has a fused one
    for all of its parameters: Adam, AdamW or SGD, floating-point parameters on
    fused-capable devices with dense gradients (`sparse`: the ids of those without), and
    no `differentiable` or `capturable` group."""
    if type(optimizer) not in FUSABLE:
        return False
    devices = fused_devices()
    for group in optimizer.param_groups:
        if group.get("foreach") is not None or group.get("fused") is not None \
                or group.get("differentiable") or group.get("capturable"):
            return False
        for p in group["params"]:
            if p.device.type not in devices or not p.is_floating_point() or id(p) in sparse:
                return False
    return True


def fuse(optimizer: torch.optim.Optimizer) -> None:
    """Switch the optimizer to its fused kernel, as `fused=True` at its creation would (also
    after a rollback loaded a checkpoint's state into it): a foreach optimizer keeps its
    step counts on the CPU, a fused one on the parameter's device, in float32."""
    optimizer.defaults["fused"], optimizer.defaults["foreach"] = True, False
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(p.device, torch.float32)
    # Not `_step_supports_amp_scaling`: a GradScaler (and Lightning's AMP plugin, which
    # then refuses gradient clipping) treats the optimizer as the user built it.


class NanGuard:
    """The guard of one run: its mode and the flag it keeps on the device."""

    def __init__(self, mode: str, sparse: set[int] | None = None) -> None:
        """`sparse`: the ids of the parameters whose gradients are sparse."""
        if mode not in NAN_GUARDS:
            raise ValueError(f"nan_guard must be one of {', '.join(NAN_GUARDS)}, got {mode!r}")
        self.requested = mode
        self.sparse = sparse or set()
        self.mode = "exact" if mode == "exact" else "device"
        self.fused = False  # the optimizer in force skips on the device itself
        self._flag: torch.Tensor | None = None  # 1.0 once a gradient was not finite
        self._one: torch.Tensor | None = None
        self._checked: tuple[int, int, int] | None = None  # the gradients _dense is for
        self._dense = False

    def adopt(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Settle how this optimizer's updates are refused; what was changed, if anything,
        for the run's log."""
        switched = None
        if self.requested != "exact" and not runs_fused(optimizer) \
                and can_fuse(optimizer, self.sparse):
            fuse(optimizer)
            switched = f"{type(optimizer).__name__} runs its fused kernel, which skips a " \
                "non-finite update on the device (nan_guard: no host sync a step)"
        self.fused = runs_fused(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if any(id(p) in self.sparse for p in params):
            self.mode = "exact"  # sparse gradients cannot be zeroed in place on the device
        elif self.requested == "auto":
            on_cpu = all(p.device.type == "cpu" for p in params)
            self.mode = "exact" if on_cpu and not self.fused else "device"
        return switched

    def flag(self, device: torch.device) -> torch.Tensor:
        if self._flag is None or self._flag.device != device:
            self._flag = torch.zeros((), device=device)
            self._one = torch.ones((), device=device)
        return self._flag

    def _one_kernel(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    device: torch.device) -> bool:
        """Whether one kernel can check all the gradients: dense, on one device. Asked once
        per set of parameters (a model's 200 cost 100 µs of Python a step)."""
        key = (len(params), id(params[0]), id(params[-1]))
        if self._checked != key:
            self._checked = key
            self._dense = all(g.device == device and not g.is_sparse for g in grads)
        return self._dense

    def check(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
              grads: Sequence[torch.Tensor], total: torch.Tensor | None) -> bool:
        """Raise the flag when the coming update is not finite, on the device; refuse the
        update as the mode says. True when the gradients must be dropped now (exact)."""
        flag = self.flag(grads[0].device)
        if total is not None:  # the clipping (or the framework) has the norm already
            flag.masked_fill_(torch.isfinite(total).logical_not_().to(flag.device), 1.0)
        elif self._one_kernel(params, grads, flag.device):
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, self._one)
        else:  # several devices, or sparse gradients
            total = torch.nn.utils.get_total_norm(grads).to(flag.device)
            flag.masked_fill_(torch.isfinite(total).logical_not_(), 1.0)
        if self.mode == "exact":
            if not flag.item():
                return False
            flag.zero_()
            return True
        if self.fused:
            optimizer.found_inf = flag
        else:
            bad = flag.bool()
            for g in grads:
                g.masked_fill_(bad, 0.0)
        return False

    def scaler_skips(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether a GradScaler handed this (fused) optimizer its own `found_inf`: the
        scaler then skips a non-finite update, and an overflow is routine, not a blow-up."""
        found_inf = getattr(optimizer, "found_inf", None)
        return found_inf is not None and found_inf is not self._flag

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer is the user's again: no `found_inf` left on it."""
        if self._flag is not None and optimizer.__dict__.get("found_inf") is self._flag:
            del optimizer.found_inf

    def tripped(self) -> bool:
        """At a log (one host read): whether an update was refused on the device since the
        last one; the flag is lowered again."""
        if self.mode == "exact" or self._flag is None or not self._flag.item():
            return False
        self._flag.zero_()
        return True
