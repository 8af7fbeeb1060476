"""GGUF files (llama.cpp's format) as Hugging Face Llama / Qwen2 models, read with the `gguf` package:
opening and metadata (reader.py), config.json and generation_config.json (config.py), tensors by
Hugging Face name, dequantized slice by slice (weights.py), the tokenizer (tokenizer.py), and the
whole folder (convert.py). Written back the other way: a Hugging Face folder (Llama family, GPT-2)
as a GGUF file (writer.py) with its tokenizer (vocab.py)."""

from mpisplit.models.gguf.config import generation_config, hf_config
from mpisplit.models.gguf.convert import convert_to_hf
from mpisplit.models.gguf.tokenizer import write_tokenizer
from mpisplit.models.gguf.weights import GGUFWeights
from mpisplit.models.gguf.writer import GGUFExport, write_gguf

__all__ = ["GGUFExport", "GGUFWeights", "convert_to_hf", "generation_config", "hf_config", "write_gguf",
           "write_tokenizer"]
