"""Error types shared by every protocol module."""


class ProtocolError(Exception):
    """Input from a peer that breaks the protocol: malformed, oversized or invalid."""

    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class MalformedFrame(ProtocolError):
    code = "malformed_frame"


class InvalidMessage(ProtocolError):
    code = "invalid_message"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class RecordError(ProtocolError):
    """A signed record that must not be trusted: bad signature, expired, replayed, mismatched."""

    code = "bad_record"


class IdentityError(Exception):
    """An identity file that cannot be used (unreadable, malformed, unsafe permissions)."""
