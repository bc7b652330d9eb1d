"""Weight-only quantization: int8 (per channel), int4 (groupwise), int4 by GPTQ.

    quantize(model, section, calibration=None, progress=None) -> model   (in place)
    quantized_skeleton(model, section) -> model      (empty layers to load a quantized checkpoint)
    pack_for(model, device) -> {layer: kernel}       (kernel layouts, once the model is on device)
    use_activations(model, section)                  (int4 layers: int8 activations on runner's kernels, or not)
    model_bytes(model) -> int
    metadata(section) -> dict / from_metadata(dict) -> section   (what a quantized checkpoint records)
    calibration_tokens(ids, section, source) -> LongTensor [samples, seq_len]   (int4-gptq)

Pure math: int8.py, int4.py (quantize, dequantize, pack), gptq.py; each layout's matmuls: matmuls.py.
"""
from runner.quant.calibrate import calibration_tokens
from runner.quant.linear import Int4Linear, Int8Embedding, Int8Linear
from runner.quant.model import (from_metadata, is_quantized, metadata, model_bytes, needs_calibration, pack_for,
                                quantize, quantized_skeleton, transform, use_activations)

__all__ = ["Int4Linear", "Int8Embedding", "Int8Linear", "calibration_tokens", "from_metadata", "is_quantized",
           "metadata", "model_bytes", "needs_calibration", "pack_for", "quantize", "quantized_skeleton", "transform",
           "use_activations"]
