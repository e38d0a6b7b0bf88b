"""The HTTP side of the entry: the Starlette app, request parsing, response building, API
keys, rate limits, metrics and the web chat."""
