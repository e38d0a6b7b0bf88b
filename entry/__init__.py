"""The entry node users talk to: the OpenAI-compatible API and web chat (`api`), the mesh
relay, live view and node router (`mesh`), output verification (`verify`) and the credits
ledger (`credits`); `backend` is the seam between the API and the mesh."""
