"""``import graphprune`` stays lean: the optional heavy dependencies (plots, scikit-learn,
onnxruntime, model zoos) are imported only by the calls that need them."""

from __future__ import annotations

import json
import subprocess
import sys


HEAVY = ("matplotlib", "sklearn", "onnxruntime", "transformers", "timm", "torchvision",
         "ultralytics")



def _pulled_in(statement: str) -> list[str]:
    """The heavy modules in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    probe = (f"import json, sys\n{statement}\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_graphprune_pulls_in_no_heavy_optional_dependency():
    pulled = _pulled_in("import graphprune")
    assert not pulled, f"import graphprune imported {pulled}"


def test_the_probe_reports_what_a_statement_imports():
    assert _pulled_in("import sklearn.utils") == ["sklearn"]
