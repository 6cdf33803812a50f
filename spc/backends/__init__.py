"""Translations of spc's ONNX models to other frameworks (imported on demand: importing spc never imports torch)."""
