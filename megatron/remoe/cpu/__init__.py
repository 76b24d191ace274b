"""The CPU backend: megatron-core on gloo without CUDA (`backend`), a grouped expert MLP for CPU
(`experts`) and thread/allocator settings (`settings`)."""
