"""Every module imports on its own: an import cycle shows only when a module is imported first."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
import rsdino
names = sorted(m.name for m in pkgutil.walk_packages(rsdino.__path__, "rsdino."))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "rsdino" or m.startswith("rsdino.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(len(names))
print("\\n".join(failed))
"""


def test_every_module_imports_first() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    ).stdout
    count, *failures = out.splitlines()
    assert int(count) > 50
    assert not [line for line in failures if line], "\n".join(failures)
