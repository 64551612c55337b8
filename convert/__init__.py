"""convert: PyTorch SR checkpoints to .tflite and .mlpackage files, dense and sparse-encoded, with parity checks.

- `convert.tflite`: litert-torch conversion with NHWC float32 I/O at a fixed tile size;
- `convert.sparse_tflite`: CSR + DENSIFY rewrite of conv filters in the flatbuffer (numpy + flatbuffers only);
- `convert.coreml`: Core ML ML Program, and its sparse variant (constexpr_sparse_to_dense);
- `convert.parity`: TFLite-vs-torch checks on a real photo tile;
- `convert.pipeline.convert_checkpoint`: all of it for one checkpoint, with manifest.json; `convert.cli` wraps it.

Submodules are imported on use: `import convert` alone stays cheap.
"""

import logging
import os


def quiet_converters() -> None:
    """The converters narrate every pass; edgesr logs one line per artifact instead. Call before they import."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' pass progress bars
    logging.getLogger("coremltools").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # litert-torch calls logging.info() on the root logger per op
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
