"""torch -> ONNX: export, simplification, precision variants and verification (needs torch and onnx)."""
