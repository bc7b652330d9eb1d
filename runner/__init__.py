"""runner: fast, PyTorch-native LLM text generation driven by YAML recipes."""
