"""What node and entry agree on: frames, messages, identities, signed records, credit queries.

Pure code: no network I/O (the transport package carries these bytes), so every part can be
fuzzed alone. `identity` reads and writes key files; nothing else touches the disk.
"""

PROTOCOL_VERSION = 2
INFER_PROTOCOL_ID = "/mesh/infer/1"
