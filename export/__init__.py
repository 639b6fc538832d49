"""Checkpoint -> engine conversion: the `tte-export` CLI and what it writes.

- `pipeline`: the export run (resolve the checkpoint, load, calibrate, write each target into a
  temporary directory, rename it into place at the end); `cli`: the command line.
- `native`: the native engine directory (read back by `tte_engine.engine_dir`), float or FP8.
- `calibration`: built-in calibration items and the FP8 accuracy report.
- `trtllm`: TensorRT-LLM checkpoint writer, build script, and a reader back into our engine.
- `onnx_export`: vision tower, embedding head and think=False embed path as ONNX graphs.

The heavy modules are imported on use, so `import tte_engine.export` stays cheap.
"""
