"""Command handlers named by module path, so building the ``rsdino`` parser imports no torch."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def lazy_handler(target: str) -> Handler:
    """``"package.module:function"`` as a handler that imports its module when the command runs.

    ``rsdino --help`` and argument errors then cost the parser alone; only the command that runs
    pays for torch and the data stack.
    """
    module_name, _, name = target.partition(":")

    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module_name), name)(args)

    return handler
