"""megatron-remoe: ReLU-routed Mixture-of-Experts (ReMoE, arXiv 2412.14711) for Megatron-Core.

`megatron` is a namespace package shared with megatron-core: there is deliberately no
`megatron/__init__.py`.

Importing the package (or any module of it) installs no warning filter and no log handler outside
the `megatron.remoe` logger; the entry points set up their console (megatron/remoe/logs.py).
"""

import logging
import sys

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())  # library use: the application decides


def _started_as_our_module() -> bool:
    """`python [options] -m megatron.remoe.<module>`: the process is one of our entry points. `-m`
    imports the packages above the module (and a module's own imports) before its `__main__` code
    can set up the console, and megatron-core warns at import."""
    args = iter(getattr(sys, "orig_argv", [])[1:])
    for token in args:
        if token == "-m":
            return next(args, "").startswith("megatron.remoe")
        if token in ("-W", "-X"):  # the interpreter options that take a separate value
            next(args, None)
        elif token in ("-c", "-") or not token.startswith("-"):  # a command, stdin or a script
            return False
    return False


if _started_as_our_module():
    from megatron.remoe.logs import configure

    configure()
