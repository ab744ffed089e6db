"""Host preprocessing: everything the runtime computes on the CPU around the graphs.

Tokenizer and prompt templates (`text`), image loading (`image`) and Qwen2.5-VL's
preprocessing (`image_preprocess`, `vision_grid`, `vision_feeds`), M-RoPE position ids
(`mrope`). Pure functions over numpy and PIL; no session is called here.
"""
