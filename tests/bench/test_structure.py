"""bench/structure.py: the structure figures count what a tiny package really holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

# A package of four modules: errors (a leaf), sources/a, engine/b, insight/c. engine/b imports
# insight/c at the top (backward), sources/a imports engine/b inside a function (backward, and a
# cycle with b importing a back), insight/c probes a feed and takes a private name of engine/b.
FILES = {
    "__init__.py": "",
    "errors.py": "class MergeError(Exception):\n    pass\n",
    "sources/__init__.py": "",
    "sources/a.py": "from ..errors import MergeError\n\n\ndef f():\n    from ..engine.b import g\n    return g\n",
    "engine/__init__.py": "",
    "engine/b.py": "from ..insight.c import h\nfrom ..sources.a import f\n\n\ndef g():\n    return 1\n\n\n"
                   "def _hidden():\n    pass\n",
    "insight/__init__.py": "",
    "insight/c.py": "from ..engine.b import _hidden\n\n\ndef h(feed):\n"
                    + "    x = 1\n" * 20 + "    return getattr(feed, 'readers', 1)\n",
}


def _figures(root: Path) -> str:
    out = subprocess.run([sys.executable, str(BENCH / "structure.py"), str(root)], capture_output=True, text=True,
                         check=True)
    return out.stdout


def test_structure_counts_backward_imports_cycles_probes_private_names_and_long_units(tmp_path):
    pkg = tmp_path / "pkg"
    for name, text in FILES.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    text = _figures(pkg)
    assert "modules: 8" in text
    assert "backward imports: 2 (1 at module level," in text
    assert "pkg.engine.b -> pkg.insight.c  (engine -> insight, top)" in text
    assert "pkg.sources.a -> pkg.engine.b  (sources -> engine, in a function)" in text
    assert "import cycles (modules importing each other, package __init__ left out): 1" in text
    assert "pkg.engine.b <-> pkg.insight.c <-> pkg.sources.a" in text
    assert "type probes on seams (getattr/hasattr literal, isinstance): 1" in text
    assert "pkg.insight.c:25 getattr(feed, 'readers')" in text
    assert "private names imported across modules: 1" in text
    assert "pkg.insight.c <- pkg.engine.b._hidden" in text
    assert "      22 pkg.insight.c.h" in text  # the longest function, first


def test_structure_runs_on_the_package_itself():
    text = _figures(BENCH.parent / "hf_metagpt")
    assert "type probes on seams (getattr/hasattr literal, isinstance): 0" in text
    assert "hf_metagpt.localhub.server.LocalHub" in text
