"""Registered operators that have no proof case, each with the reason. Data, not skips:
prove_registry_coverage.py fails for any registered operator that is neither proved nor listed
here, and for any entry here that has a proof case after all."""
from __future__ import annotations

_CREATION = ("creation operator without tensor operands: its result depends on no label and there "
             "is no input to differentiate against (the rule returns empty sets, checked by the driver's "
             "shape check)")
_RANDOM_CREATION = ("random creation operator without tensor operands: its values are fresh random "
                    "variables that depend on no label (no input to differentiate against)")

EXEMPT: dict[str, str] = {
    "aten.arange.default": _CREATION,
    "aten.arange.start": _CREATION,
    "aten.arange.start_step": _CREATION,
    "aten.empty.memory_format": _CREATION,
    "aten.empty_strided.default": _CREATION,
    "aten.eye.default": _CREATION,
    "aten.full.default": _CREATION,
    "aten.linspace.default": _CREATION,
    "aten.ones.default": _CREATION,
    "aten.zeros.default": _CREATION,
    "aten.scalar_tensor.default": _CREATION + "; its scalar argument is a Python number, not a tensor",
    "aten.tril_indices.default": _CREATION,
    "aten.triu_indices.default": _CREATION,
    "aten.rand.default": _RANDOM_CREATION,
    "aten.randn.default": _RANDOM_CREATION,
    "aten.randint.default": _RANDOM_CREATION,
    "aten.randint.low": _RANDOM_CREATION,
    "aten.randperm.default": _RANDOM_CREATION,
    "aten._local_scalar_dense.default": ("returns a Python scalar (Tensor.item()), not a tensor: torch.export "
                                         "turns it into an unbacked symbol, so there is no label tensor to "
                                         "compare; its value is an input element, whose derivative flows "
                                         "only through shape arithmetic"),
    "aten.nonzero.default": ("output shape depends on the values (torch.export needs unbacked sizes) and the "
                             "output holds integer indices, whose derivative is zero by type"),
    "aten.cudnn_batch_norm.default": ("CUDA-only kernel: it cannot be run or traced on CPU; it computes what "
                                      "native_batch_norm computes (proved in prove_norms.py) and shares its rule"),
}
