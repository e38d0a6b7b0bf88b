"""What node and entry must agree on: frames, messages, identities, signed records, DHT keys.

Pure code with no I/O beyond a stream interface, so every part can be fuzzed alone.
"""

PROTOCOL_VERSION = 1
INFER_PROTOCOL_ID = "/mesh/infer/1"
