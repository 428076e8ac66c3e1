"""Export of trained networks for other runtimes: onnx.py (an ONNX graph + its settings), cli.py (`asr export`)."""
