"""Every message that crosses a qrexec boundary, with encode and decode.

Pure: bytes in, objects out, no I/O. docs/protocol.md describes the wire
format with an example of each message. One concept per module:

* :mod:`.fields`: every range and charset, ProtocolError, Role and
  RevokeStatus, and the reading of untrusted header fields;
* :mod:`.refs`: grant refs as their wire bytes (GrantRefs);
* :mod:`.buffers`: buffer layouts (BufferSpec, BufferMeta) as fields;
* :mod:`.message`: the message base and the type line;
* :mod:`.qube_calls`: a qube's calls about a lease, and the lease answer;
* :mod:`.agent_calls`: the broker's calls to an agent (export, revoke);
* :mod:`.lease_list`: a qube's list of its leases;
* :mod:`.replies`: Ok and Error;
* :mod:`.wire`: the framing, encode, decode and the size bounds.

Callers use this package's names (``protocol.decode``,
``from ..protocol import LeaseAnswer``), never the modules; names with a
leading underscore are the package's own.

Why so strict: the broker in dom0 reads these bytes from qubes it must not
trust, and agents read them from a broker they should not have to trust
blindly. Every decoder:

* refuses input longer than the type's fixed maximum (:data:`MAX_SIZE`)
  before parsing anything, so the I/O layer can do bounded reads;
* accepts printable ASCII only, ``key=value`` lines with no blanks around
  values, decimal integers with no sign or leading zero, names checked by
  :mod:`..names` and buffer layouts checked by :mod:`..formats`;
* raises :class:`ProtocolError` (a ``ValueError`` with a one-line reason)
  and nothing else, whatever the input.

Messages validate themselves on construction, so whatever encodes also
decodes, to an equal message.
"""

from ..formats import ReceiveMode
from .agent_calls import ExportAnswer, ExportRequest, RevokeAnswer, \
    RevokeRequest
from .fields import (MAX_DEADLINE, MAX_DOMID, MAX_TEXT, MAX_TTL,
                     ProtocolError, RevokeStatus, Role)
from .lease_list import (MAX_LIST_LEASES, MAX_LIST_LINE, LeaseEntry,
                         LeaseList, ListRequest)
from .message import MessageType, _Message
from .qube_calls import LeaseAnswer, LeaseRequest, OfferRequest, \
    ReleaseRequest
from .refs import REF_SIZE, GrantRefs
from .replies import Error, Ok
from .wire import (MAGIC, MAX_HEADER, MAX_SIZE, MESSAGES, Message, decode,
                   encode, frame_length, max_size_for)

__all__ = [
    "Error", "ExportAnswer", "ExportRequest", "GrantRefs", "LeaseAnswer",
    "LeaseEntry", "LeaseList", "LeaseRequest", "ListRequest", "MAGIC",
    "MAX_DEADLINE", "MAX_DOMID", "MAX_HEADER", "MAX_LIST_LEASES",
    "MAX_LIST_LINE", "MAX_SIZE", "MAX_TEXT", "MAX_TTL", "MESSAGES",
    "Message", "MessageType", "OfferRequest", "Ok", "ProtocolError",
    "REF_SIZE", "ReceiveMode", "ReleaseRequest", "RevokeAnswer",
    "RevokeRequest", "RevokeStatus", "Role", "_Message", "decode",
    "encode", "frame_length", "max_size_for"]
