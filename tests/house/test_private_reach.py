"""No module of the package reaches into another object's private members.

``x._name`` is allowed only on ``self`` / ``cls`` (an object's own members); the compiled
extension module ``_C`` and dunders are names, not private members. Read with ``ast`` over
cacheaug_engine/ and triton_kernels/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_OWNERS = {"self", "cls"}
# torch._dynamo: mark_static_address (generation/generate.py) has no public alias yet; HF StaticCache uses it too.
# Tensor._version: the in-place version counter (what autograd checks saved tensors with), used by
# ops/frozen_linear.py to notice a weight changed in place; torch.ops.mkldnn._reorder_linear_weight /
# _linear_pointwise: oneDNN's packed linear, the ops inductor's CPU freezing calls (no public alias);
# torch.ops.mkldnn._is_mkldnn_bf16_supported: whether oneDNN runs bf16 natively here (device.py's
# slow-bf16 note; torch.backends.cpu.get_cpu_capability does not tell AVX512 from AVX512-BF16).
ALLOWED_NAMES = {"_C", "_dynamo", "_version", "_reorder_linear_weight", "_linear_pointwise",
                 "_is_mkldnn_bf16_supported"}


def private_reaches(source: str) -> list[tuple[int, str]]:
    """(line, "owner._name") for every attribute access to a private name on another object."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or attr in ALLOWED_NAMES:
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ALLOWED_OWNERS:
            continue
        found.append((node.lineno, f"{ast.unparse(owner)}.{attr}"))
    return found


def test_detector():
    code = "self._a\ncls._b\nmod._parameters['w']\nx.__dict__\nimport_it._C\ndecoder._run(x)\n"
    assert private_reaches(code) == [(3, "mod._parameters"), (6, "decoder._run")]


def test_no_private_reach_inside_the_package():
    bad = []
    for folder in ("cacheaug_engine", "triton_kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, what in private_reaches(path.read_text(encoding="utf-8")):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert bad == []
