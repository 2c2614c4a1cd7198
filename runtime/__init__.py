"""The torch-free runtime: bundles, KV buffers, decoding loops."""
