"""setup.py's choice of the ONNX Runtime requirement (`LMCOR_ONNXRUNTIME`), read from the file: its
module runs `setup()` when imported."""

import ast
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


def _requirement_function():
    tree = ast.parse(SETUP.read_text())
    keep = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "_onnxruntime_requirement"
            or isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ORT_FLOOR" for t in node.targets)]
    namespace = {"os": __import__("os"), "shutil": __import__("shutil"), "_installed_onnxruntime": lambda: None}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace["_onnxruntime_requirement"], namespace["ORT_FLOOR"]


@pytest.mark.parametrize("forced, expected", [
    ("onnxruntime-gpu", "onnxruntime-gpu>={floor}"),
    ("onnxruntime-gpu==1.22.0", "onnxruntime-gpu==1.22.0"),
    ("onnxruntime-gpu @ file:///wheels/onnxruntime_gpu-1.22.0-cp311-cp311-linux_x86_64.whl",
     "onnxruntime-gpu @ file:///wheels/onnxruntime_gpu-1.22.0-cp311-cp311-linux_x86_64.whl"),
])
def test_lmcor_onnxruntime_is_a_valid_requirement(monkeypatch, forced, expected):
    requirement, floor = _requirement_function()
    monkeypatch.setenv("LMCOR_ONNXRUNTIME", forced)
    chosen = requirement()
    assert chosen == expected.format(floor=floor)
    Requirement(chosen)  # pip would refuse an invalid one
