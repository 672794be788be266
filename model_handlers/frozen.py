"""Convolutional towers on the CPU as frozen TorchScript graphs over channels-last weights.

Freezing folds batch norm into the convolutions and runs the whole forward pass as one C++
call: no Python and no GIL between its ops, so the download threads' Python can't hold up
the model. Channels-last is oneDNN's fast layout for convolutions, and decoded pixels (HWC)
arrive in it without a copy (`normalize_on_device` keeps their strides). EfficientNet-Lite0
runs 1.2-1.3x as fast as in eager mode (the bare model of `python -m bench.pipeline`).
TorchScript is deprecated in favour of `torch.compile`, but that needs a C++ compiler on every
worker and minutes of compiling at each start; a frozen graph is built in about a second.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["freeze_for_cpu"]


def freeze_for_cpu(module: torch.nn.Module, image_size: int) -> torch.jit.ScriptModule:
    """`module` (normalised NCHW float images → features, in eval mode) as a frozen graph.

    The graph is traced at batch 2 and takes any batch size. It is meant for fp32: TorchScript's
    own autocast pass covers only part of a frozen graph, so reduced precision keeps the eager
    module, where autocast is torch's supported path."""
    module = module.to(memory_format=torch.channels_last)
    example = torch.zeros(2, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the TorchScript deprecation, see above
        return torch.jit.freeze(torch.jit.trace(module, example))
