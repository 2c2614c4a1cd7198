"""Turn Hugging Face / GGUF models into edgespec bundles (needs the [export] extra)."""
