"""megatron-remoe: ReLU-routed Mixture-of-Experts (ReMoE, arXiv 2412.14711) for Megatron-Core.

`megatron` is a namespace package shared with megatron-core: there is deliberately no
`megatron/__init__.py`.
"""

__version__ = "0.1.0"

from megatron.remoe.log_filters import install as _quiet_known_noise  # noqa: E402

_quiet_known_noise()  # before any entry point of ours imports megatron-core
