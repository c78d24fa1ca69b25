"""GGUF files in and out, through the `gguf` package's reader and writer.

- `reader`: what a GGUF file says (architecture, block count, per-block arrays), the refusal of a
  layer pattern llama.cpp derives from positions, and the byte copy of tensors into a new file;
- `pruned`: a GGUF source without some blocks, kept tensors copied byte for byte (`GgufFromGguf`);
- `from_hf`: a Hugging Face model written as GGUF in f16, bf16 or q8_0 (`GgufFromHf`);
- `deci`: a llama GGUF without some attention layers, as llama.cpp's deci architecture (`DeciGguf`).

Each output format is a `sleb.writer.Writer`, registered in `sleb.saver`. This package imports
none of its modules itself: import them by name (`from sleb.gguf_io.reader import block_count`).
"""
