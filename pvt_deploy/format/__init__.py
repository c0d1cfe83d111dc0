"""The model folder's format, torch-free and below export and runtime: ``manifest.json`` as typed dataclasses
(``manifest.py``), the preprocessing contract (``contract.py``), and the JSON mapping both use (``codec.py``).

Export fills these dataclasses and writes them (``write_manifest``); the runtime, ``info``, ``verify``, bench and
services read them (``load_manifest``). Nothing here imports torch, onnx or onnxruntime."""
