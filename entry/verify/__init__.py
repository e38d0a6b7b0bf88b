"""Output verification: sampling of requests, re-scoring by replay (`verifier`), the
statistical tests (`stats`) and canary probes (`canary`)."""
