"""The PyTorch frontend: the runtime's streaming I/O under your own PyTorch code.

    from gdsllm.torch import gds_tensor, io_path, open_model, stream_layers

    t = gds_tensor("w.bin", (4096, 4096), torch.float16, offset=8192)  # a byte range -> CUDA tensor
    io_path("cuda")                                   # "gds", "compat" or "posix": the path taken

    with open_model("~/models/x", device="cuda") as m:   # units by name, loaded on demand
        w = m["block.0"]["mlp.up_proj.weight"]        # a tensor, or a QuantWeight (.dequantize)

    for unit in stream_layers("~/models/x", budget="2GiB", window=2):   # in order, prefetched
        x = my_forward(unit, x)

Every read takes the runtime's own path (gdsllm.format.storage through gdsllm.engine.loader):
KvikIO straight into VRAM on CUDA (`gds`, or `compat`: O_DIRECT through pinned bounce buffers),
O_DIRECT into host memory on the CPU (`posix`); never the page cache. Tensors are views over the
buffers that hold the bytes (gdsllm.models.views): see `Unit` for how long they stay valid.
This package sits on top of the others; nothing in gdsllm imports it.
"""
from gdsllm.torch.model import OpenModel, open_model
from gdsllm.torch.stream import LayerStream, stream_layers
from gdsllm.torch.tensor import gds_tensor, io_path
from gdsllm.torch.unit import Unit

__all__ = ["gds_tensor", "io_path", "open_model", "OpenModel", "stream_layers", "LayerStream", "Unit"]
