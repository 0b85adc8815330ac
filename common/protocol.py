"""Every message that crosses a socket in exegpt, as typed frozen dataclasses.

Wire format (byte by byte in docs/wire.md): frame 0 = one type byte, frame 1 = msgpack map
with "v" = PROTOCOL_VERSION and one entry per field in declaration order, frames 2.. = raw
tensor bytes. `encode(msg)` / `decode(frames)` convert; decoding is strict and raises only
`ProtocolError`. No pickle anywhere.

Who sends what (-> direction):

    client      Submit, Cancel, StatsRequest            -> coordinator (DEALER -> ROUTER)
    coordinator StreamChunk, Result, Error, Stats       -> client
    worker      Hello, Ready, Heartbeat, DecodeTokens, Error, Stats -> coordinator
    coordinator Assign, EncodeBatch, Cancel, Heartbeat, StatsRequest, Shutdown -> worker
    encoder     KVHandoff                               -> decoder (directly, never via the
                                                           coordinator)

Startup handshake: worker Hello -> coordinator Assign -> worker Ready. Type bytes are grouped:
0x0_ control, 0x1_ client-facing, 0x2_ data plane. New message types get new bytes; a
change to an existing message's fields bumps PROTOCOL_VERSION.
"""

from __future__ import annotations

from common.errors import ProtocolError
from common.protocol_codec import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Json,
    Limits,
    Message,
    Struct,
    Tensor,
    decode,
    encode,
    message_types,
    peek_req_id,
)
from common.protocol_control import Assign, Heartbeat, Hello, Ready, Shutdown

# import order = registration order: message_types() lists 0x0_, then 0x1_, then 0x2_
# isort: split
from common.protocol_client import (
    Cancel,
    Error,
    Result,
    Stats,
    StatsRequest,
    StreamChunk,
    Submit,
    error_for,
)

# isort: split
from common.protocol_data import (
    PASS_KINDS,
    DecodeTokens,
    EncodeBatch,
    EncodeRequest,
    KVHandoff,
    KVPayload,
    PassDone,
    StagePass,
    TokenUpdate,
)
from common.protocol_values import (
    FINISH_REASONS,
    MAX_ID_LEN,  # noqa: F401 - importable as before
    ROLES,
    Lifecycle,
    Sampling,
)

__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_LIMITS", "Limits", "Message", "Struct", "Tensor", "Json",
    "ProtocolError", "encode", "decode", "message_types", "peek_req_id",
    "ROLES", "FINISH_REASONS", "Sampling", "Lifecycle", "Hello", "Assign", "Ready",
    "Heartbeat", "Shutdown", "Submit", "StreamChunk", "Result", "Cancel", "Error",
    "StatsRequest", "Stats", "EncodeRequest", "EncodeBatch", "KVPayload", "KVHandoff",
    "TokenUpdate", "DecodeTokens", "StagePass", "PassDone", "PASS_KINDS", "error_for",
]
