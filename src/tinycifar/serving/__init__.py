"""Using a trained network: the inference model (normalization inside), prediction on image files,
export to ONNX/TorchScript, and the web page with its JSON API (``tinycifar serve``)."""
