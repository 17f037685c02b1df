"""Write the op schemas of astra_kernels/ops.py (``SCHEMAS``) as a C++ header.

For the C++ test, which has no Python to give ``astra_C`` its schemas. Reads ops.py
as text (no torch import): ``SCHEMAS`` must stay a literal dict.

    python gen_op_schemas.py astra_kernels/ops.py out/astra_op_schemas.h
"""
import ast
import json
import os
import sys


def schemas(ops_py: str) -> dict:
    with open(ops_py, encoding="utf-8") as f:
        tree = ast.parse(f.read(), ops_py)
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "SCHEMAS" for t in targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{ops_py}: no literal SCHEMAS dict")


def main(ops_py: str, out_h: str) -> None:
    lines = ["// Generated from astra_kernels/ops.py (SCHEMAS) by csrc/tests/gen_op_schemas.py.",
             "#pragma once", "", "namespace astra {", "",
             "inline constexpr const char* kOpSchemas[] = {"]
    lines += [f"    {json.dumps(s)}," for s in schemas(ops_py).values()]
    lines += ["};", "", "}  // namespace astra", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(out_h)), exist_ok=True)
    old = None
    if os.path.exists(out_h):
        with open(out_h, encoding="utf-8") as f:
            old = f.read()
    if old != text:  # unchanged output keeps its timestamp: no needless recompile
        with open(out_h, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
