"""convert: PyTorch SR checkpoints to .tflite and .mlpackage files, dense and sparse-encoded, with parity checks.

- `convert.tflite`: litert-torch conversion with NHWC float32 I/O at a fixed tile size;
- `convert.sparse_tflite`: CSR + DENSIFY rewrite of conv filters in the flatbuffer (numpy + flatbuffers only);
- `convert.coreml`: Core ML ML Program, and its sparse variant (constexpr_sparse_to_dense);
- `convert.receptive_field`: measured receptive-field radius, the overlap the device runner tiles with;
- `convert.parity`: TFLite-vs-torch checks on a real photo tile;
- `convert.pipeline.convert_checkpoint`: all of it for one checkpoint, with manifest.json; `convert.cli` wraps it.

Submodules are imported on use: `import convert` alone stays cheap.
"""
