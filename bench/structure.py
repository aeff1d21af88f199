"""Structure figures of the package, from its source alone (nothing imported, nothing run).

    python bench/structure.py [PACKAGE_DIR]      # default: hf_metagpt next to this folder

Prints: imports between stages that run backwards (a stage importing a later one), import cycles
between modules, type probes (getattr/hasattr with a literal attribute name, isinstance on the
engine's seams), the longest functions and classes, and private names imported across modules.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

#: the stages in the order data flows; a module may import from its own stage or an earlier one
STAGES = [
    ("leaf", {"errors", "constants", "_version", "_platform", "_logging", "_progress", "safetensors_io", "dtype_names"}),
    ("options", {"options", "mergekit_recipe"}),
    ("sources", {"sources"}),
    ("methods", {"methods"}),
    ("engine", {"engine"}),
    ("insight", {"insight"}),
    ("result", {"result"}),
    ("publish", {"publish"}),
    ("api", {"api", "inspect_api"}),
    ("evaluation", {"evaluation"}),
    ("tools", {"localhub", "demo"}),
    ("front", {"cli", "__main__", "_launch", "extension", "__init__"}),
]
#: a first argument of getattr/isinstance naming one of the executor's seams or a method
SEAMS = ("feed", "kernel", "sink", "provider", "files", "method", "source", "executor")


def stage_of(mod: str) -> tuple[int, str]:
    head = mod.split(".")[1] if "." in mod else "__init__"
    for i, (name, members) in enumerate(STAGES):
        if head in members:
            return i, name
    return len(STAGES), head


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1] if len(parts) > 2 else parts
        out[".".join(parts)] = path
    return out


def resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name a `from ... import` names (relative to the importing module's package)."""
    parts = mod.split(".")
    pkg = (parts[:-1] if parts[-1] == "__init__" else parts) if path.name == "__init__.py" else parts[:-1]
    if node.level:
        base = pkg[: len(pkg) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def main(root: Path) -> None:
    mods = modules(root)
    top = root.name
    edges: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    backward, private, probes, units = [], [], [], []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n): "top" for n in tree.body}
        for n in tree.body:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                top_level.update({id(m): "typing" for m in n.body})
            elif isinstance(n, (ast.If, ast.Try)):
                top_level.update({id(m): "top" for m in ast.walk(n) if isinstance(m, (ast.Import, ast.ImportFrom))})
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, path, node)
                if not target.startswith(top):
                    continue
                names = [a.name for a in node.names]
                targets = [f"{target}.{n}" if f"{target}.{n}" in mods else target for n in names]
                for t, n in zip(targets, names):
                    edges[mod].add(t)
                    where.setdefault((mod, t), top_level.get(id(node), "in a function"))
                    if n.startswith("_") and not n.startswith("__") and t == target and t != mod:
                        private.append(f"{mod} <- {t}.{n}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(top):
                        edges[mod].add(a.name)
                        where.setdefault((mod, a.name), top_level.get(id(node), "in a function"))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                fn = node.func.id
                if fn in ("getattr", "hasattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                    first = ast.unparse(node.args[0])
                    if any(s in first.lower() for s in SEAMS):
                        probes.append(f"{mod}:{node.lineno} {fn}({first}, {node.args[1].value!r})")
                elif fn == "isinstance" and node.args:
                    first = ast.unparse(node.args[0])
                    kind = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
                    if any(s in first.lower() for s in SEAMS) and kind[:1].isupper() and kind not in (
                            "Path", "str", "dict", "list", "tuple", "int", "float", "bool"):
                        probes.append(f"{mod}:{node.lineno} isinstance({first}, {kind})")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                units.append((node.end_lineno - node.lineno + 1, kind, f"{mod}.{node.name}"))
    for mod, targets in edges.items():
        a = stage_of(mod)
        for t in targets:
            b = stage_of(t)
            if b[0] > a[0] and t != top and not t.endswith("__init__"):
                backward.append(f"{mod} -> {t}  ({a[1]} -> {b[1]}, {where[(mod, t)]})")
    # cycles: strongly connected components of the module graph (Tarjan)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in mods:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in mods:
        if v not in index:
            visit(v)
    cycles = [c for c in sccs if not any(m in (top, f"{top}.__init__") for m in c)]
    print(f"modules: {len(mods)}")
    tops = sum(1 for b in backward if b.endswith(", top)"))
    print(f"backward imports: {len(backward)} ({tops} at module level, the rest inside functions or for typing)")
    for line in sorted(backward):
        print("   ", line)
    print(f"import cycles (modules importing each other, package __init__ left out): {len(cycles)}")
    for c in cycles:
        print("   ", " <-> ".join(c))
    print(f"type probes on seams (getattr/hasattr literal, isinstance): {len(probes)}")
    for line in probes:
        print("   ", line)
    print(f"private names imported across modules: {len(private)}")
    for line in sorted(private):
        print("   ", line)
    units.sort(reverse=True)
    print("longest functions:")
    for n, kind, name in [u for u in units if u[1] == "def"][:8]:
        print(f"    {n:4d} {name}")
    print("longest classes:")
    for n, kind, name in [u for u in units if u[1] == "class"][:5]:
        print(f"    {n:4d} {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "hf_metagpt")
