"""Sample applications built on the runtime: `desktop` (the local server, the chat page, the terminal chat)."""
