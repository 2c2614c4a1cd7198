"""The desktop apps: an OpenAI-compatible local server with a chat page (`edgespec serve`, needs the `serve`
extra) and a terminal chat (`edgespec chat`, the runtime alone)."""
