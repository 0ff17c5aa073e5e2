"""Out-of-dialog SIP requests that pjsua answers wrongly, answered first by a pjsip module of ours.

pjsua answers these by itself, and pjsua2 has no callback to decide (checked on pjsua 2.17 with
raw requests):

- OPTIONS: always 200 (its `mod-pjsua-options`). A SIP proxy in front of many agents (Kamailio's
  dispatcher, see deploy/kamailio/) probes each agent with OPTIONS and keeps only those
  answering 2xx in rotation; a draining or full agent would look healthy and only refuse the
  INVITE itself (the proxy then fails over, one round trip later). We answer 503 ("Draining",
  "Full", "Starting") then; otherwise pjsua answers 200 as before.
- SUBSCRIBE: 200 to `Event: presence` from anyone (pjsua's presence server, which then sends
  NOTIFYs), 489 to other events (logged by pjsip at its error level), 400 without Event. The
  agent offers no event package: 489 Bad Event to every out-of-dialog SUBSCRIBE.
- MESSAGE and NOTIFY of `message-summary`: 200, though nothing reads them (a false "delivered");
  REFER, PUBLISH and other NOTIFYs: no answer at all (dropped, the sender retransmits for 32 s).
  All four: 403 Forbidden. Not 405: a 405 must carry Allow (RFC 3261 21.4.6), and pjsip's Allow
  lists REFER, NOTIFY and MESSAGE, which the agent does take inside a call.
- INVITE with Replaces (RFC 3891): pjsua matches it to a call and lets it take that call over
  (200, and BYE to our caller) before any ACL or admission; pjsua2's per-call callback that
  could refuse it (`SipCall.onCallReplaceRequest`, which does) is skipped while that call is
  being hung up. 403 here, statefully (an INVITE's retransmissions and ACK need a transaction).
- Any of these methods from a source outside `sip.allow_from`: 403, so a stranger learns
  nothing (no capacity oracle). INVITEs from outside go on to `SipTransport.incoming`, which
  refuses them with 403 and counts them as refused calls.

Refusals are counted in `personaplex_sip_refused_requests_total{method,reason}` (methods from a
fixed list: a stranger's method names never become label values).

How: pjsua2's Python binding does not wrap `pjsip_module`, but the shared library it loads
exports pjsip's C API. We register a small pjsip module through ctypes, at a priority just
before pjsua's application-level handlers and after the dialog layer, so requests inside a
dialog (the caller's REFER, NOTIFY, INFO) never reach it. No pjproject change, no rebuild.

The source address: pjsip gives a module only the `pjsip_rx_data*`, and exports no function
that returns its source. We mirror the start of `struct pjsip_rx_data` (pjsip 2.17's
sip_transport.h; the layout has been the same since 2.x) and check, for every request, that what
we read is consistent (see `read_source`); if it is not, the source counts as unknown, which is
refused (403) unless `sip.allow_from` allows every address, and we say why once.

Everything here runs on the SIP thread (the module is called from `libHandleEvents`).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

import structlog

from agent.metrics import Metrics
from telephony.admission import Admission, RefusalKind
from telephony.sip.sipmsg import allowed

log = structlog.get_logger(__name__)

# pjsip/sip_module.h: PJSIP_MOD_PRIORITY_UA_PROXY_LAYER (32) < DIALOG_USAGE (48) < APPLICATION (64).
# Below APPLICATION: we see the request before pjsua's OPTIONS, presence and call handlers; above
# the dialog layer: requests inside a dialog were consumed before us.
PRIORITY = 63
_REQUEST_PREFIX = b"Request msg "  # pjsip_rx_data_get_info(): "Request msg OPTIONS/cseq=.. (rdata0x..)"

# methods this module decides on (every other one goes on to pjsua as before)
GUARDED = frozenset({"OPTIONS", "SUBSCRIBE", "REFER", "NOTIFY", "PUBLISH", "MESSAGE"})
FORBIDDEN_OUT_OF_DIALOG = frozenset({"REFER", "NOTIFY", "PUBLISH", "MESSAGE"})

_RX_REQUEST = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)  # pj_bool_t (*)(pjsip_rx_data*)


class _PjStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t)]


class _PjsipModule(ctypes.Structure):
    """struct pjsip_module (pjsip/sip_module.h), unchanged since pjsip 1.x."""
    _fields_ = [("prev", ctypes.c_void_p), ("next", ctypes.c_void_p), ("name", _PjStr),
                ("id", ctypes.c_int), ("priority", ctypes.c_int),
                ("load", ctypes.c_void_p), ("start", ctypes.c_void_p), ("stop", ctypes.c_void_p),
                ("unload", ctypes.c_void_p), ("on_rx_request", _RX_REQUEST),
                ("on_rx_response", ctypes.c_void_p), ("on_tx_request", ctypes.c_void_p),
                ("on_tx_response", ctypes.c_void_p), ("on_tsx_state", ctypes.c_void_p)]


# -- the start of struct pjsip_rx_data (pjsip/sip_transport.h), as far as msg_info.info ---------
PJSIP_MAX_PKT_LEN = 4000  # pjsip/sip_config.h default; scripts/build_pjsua2.sh's config_site.h keeps it
PJ_INET6_ADDRSTRLEN = 46  # pj/sock.h


class _IoqueueOpKey(ctypes.Structure):
    """pj_ioqueue_op_key_t (pj/ioqueue.h)."""
    _fields_ = [("internal__", ctypes.c_void_p * 32), ("activesock_data", ctypes.c_void_p),
                ("user_data", ctypes.c_void_p)]


class _RxOpKey(ctypes.Structure):
    """pjsip_rx_data_op_key."""
    _fields_ = [("op_key", _IoqueueOpKey), ("rdata", ctypes.c_void_p)]


class _TpInfo(ctypes.Structure):
    _fields_ = [("pool", ctypes.c_void_p), ("transport", ctypes.c_void_p), ("tp_data", ctypes.c_void_p),
                ("op_key", _RxOpKey)]


class _SockaddrIn6(ctypes.Structure):
    """pj_sockaddr_in6 (no sin6_len on Linux); the largest member of the pj_sockaddr union, whose
    IPv4 form shares family, port and the first 4 bytes of `flowinfo` (sin_addr)."""
    _fields_ = [("family", ctypes.c_uint16), ("port_be", ctypes.c_ubyte * 2), ("flowinfo", ctypes.c_ubyte * 4),
                ("addr6", ctypes.c_ubyte * 16), ("scope_id", ctypes.c_uint32)]


class _PjTimeVal(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("msec", ctypes.c_long)]


class _PktInfo(ctypes.Structure):
    _fields_ = [("timestamp", _PjTimeVal), ("packet", ctypes.c_ubyte * PJSIP_MAX_PKT_LEN),
                ("zero", ctypes.c_uint32), ("len", ctypes.c_ssize_t), ("src_addr", _SockaddrIn6),
                ("src_addr_len", ctypes.c_int), ("src_name", ctypes.c_char * PJ_INET6_ADDRSTRLEN),
                ("src_port", ctypes.c_int)]


class _MsgInfo(ctypes.Structure):
    """The first members of rdata->msg_info (the rest is not read)."""
    _fields_ = [("msg_buf", ctypes.c_void_p), ("len", ctypes.c_int), ("msg", ctypes.c_void_p),
                ("info", ctypes.c_void_p)]


class RxData(ctypes.Structure):
    """The start of struct pjsip_rx_data: read in place (`from_address`), never allocated by pjsip
    from this definition, so the fields after `msg_info.info` may stay unmirrored."""
    _fields_ = [("tp_info", _TpInfo), ("pkt_info", _PktInfo), ("msg_info", _MsgInfo)]


class _PjStrAt(ctypes.Structure):
    """pj_str_t as read in place: its text is not NUL-terminated (a c_char_p would read on)."""
    _fields_ = [("ptr", ctypes.c_void_p), ("slen", ctypes.c_ssize_t)]


class _Method(ctypes.Structure):
    """pjsip_method: its id, then its name (8-aligned, so the request line starts at 8)."""
    _fields_ = [("id", ctypes.c_int), ("name", _PjStrAt)]


class _MsgHead(ctypes.Structure):
    """The start of struct pjsip_msg: type (0 = request), then the request line's method."""
    _fields_ = [("type", ctypes.c_int), ("method", _Method)]


_PACKET_OFFSET = RxData.pkt_info.offset + _PktInfo.packet.offset


def read_source(rdata: int, info: int, method: str) -> tuple[str | None, str]:
    """The source address of the request `rdata` points to, from our mirror of the struct, and
    "ok"; or None and which consistency check failed. `info` is what pjsip_rx_data_get_info()
    returned for it (pjsip caches that pointer in msg_info.info) and `method` the method it
    names. Checked: that pointer; the message buffer lies inside the packet and starts with the
    method; the packet length fits; the binary source address (family, length, port) agrees
    with the text one (src_name, src_port), which parses as an address."""
    rx = RxData.from_address(rdata)
    pkt, mi = rx.pkt_info, rx.msg_info
    if mi.info != info:
        return None, "msg_info.info is not the pointer pjsip_rx_data_get_info returned"
    if not 0 < pkt.len <= PJSIP_MAX_PKT_LEN:
        return None, "pkt_info.len out of range"
    start = rdata + _PACKET_OFFSET
    if mi.msg_buf is None or not start <= mi.msg_buf < start + pkt.len:
        return None, "msg_info.msg_buf is not inside pkt_info.packet"
    head = method.encode() + b" "
    if ctypes.string_at(mi.msg_buf, len(head)) != head:
        return None, "the message buffer does not start with the request's method"
    sa = pkt.src_addr
    if sa.family == socket.AF_INET and pkt.src_addr_len in (16, ctypes.sizeof(_SockaddrIn6)):
        binary = ipaddress.ip_address(bytes(sa.flowinfo))
    elif sa.family == socket.AF_INET6 and pkt.src_addr_len == ctypes.sizeof(_SockaddrIn6):
        binary = ipaddress.ip_address(bytes(sa.addr6))
    else:
        return None, "pkt_info.src_addr has no IPv4/IPv6 family and length"
    if int.from_bytes(bytes(sa.port_be), "big") != pkt.src_port or not 0 < pkt.src_port < 65536:
        return None, "pkt_info.src_port does not match src_addr"
    try:
        text = ipaddress.ip_address(pkt.src_name.decode("ascii"))  # c_char array: up to its NUL
    except (UnicodeDecodeError, ValueError):
        return None, "pkt_info.src_name is not an address"
    if text != binary:
        return None, "pkt_info.src_name does not match src_addr"
    return str(text), "ok"


def all_open(networks: list[str]) -> bool:
    """Whether `networks` allow every IPv4 and every IPv6 source (only then may a source we
    cannot read be let through)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    return any(n.prefixlen == 0 and n.version == 4 for n in nets) and \
        any(n.prefixlen == 0 and n.version == 6 for n in nets)


#: OPTIONS answers while no new call could be taken (the same question an INVITE is asked)
UNAVAILABLE_PHRASE = {RefusalKind.DRAINING: "Draining", RefusalKind.UNAVAILABLE: "Starting",
                      RefusalKind.BUSY: "Full"}


def unavailable_reason(admission: Admission) -> str | None:
    """Why a proxy should not send this agent a new call right now ("Draining", "Full"), or None."""
    kind = admission.availability()
    return None if kind is None else UNAVAILABLE_PHRASE.get(kind, "Unavailable")


def verdict(method: str, source: str | None, networks: list[str], unavailable: str | None,
            replaces: bool = False) -> tuple[int, str, str | None] | None:
    """What the module answers an out-of-dialog `method` request: (status, reason phrase, metric
    reason or None when it is no refusal to count), or None to let pjsua handle it. `source`
    None: unknown (fails closed unless `networks` allow everything)."""
    if method == "INVITE":
        # everything else about INVITEs (the ACL too) is SipTransport.incoming's
        return (403, "Forbidden", "replaces") if replaces else None
    if method not in GUARDED:
        return None
    if not (allowed(source, networks) if source is not None else all_open(networks)):
        return 403, "Forbidden", "forbidden_source"
    if method == "SUBSCRIBE":
        return 489, "Bad Event", "subscribe"
    if method in FORBIDDEN_OUT_OF_DIALOG:
        return 403, "Forbidden", "out_of_dialog"
    if unavailable is not None:  # OPTIONS
        return 503, unavailable, None
    return None  # OPTIONS: pjsua answers 200


class RequestFilter:
    """The registered pjsip module; keep it alive as long as the pjsua library (pjsip writes into
    the struct and calls the callback until libDestroy unregisters it)."""

    def __init__(self, cfg, metrics: Metrics, admission: Admission, lib: ctypes.CDLL):
        self.cfg = cfg  # sip settings: allow_from
        self.metrics = metrics
        self.admission = admission
        self.lib = lib
        self.answered_503 = 0
        self._layout_problem: str | None = None  # logged once
        self._name = b"mod-personaplex-filter"
        self._strings: dict[str, tuple[bytes, _PjStr]] = {}
        self._cb = _RX_REQUEST(self._on_rx_request)  # referenced: ctypes must not free the thunk
        self.module = _PjsipModule()
        self.module.name = _PjStr(self._name, len(self._name))
        self.module.id = -1
        self.module.priority = PRIORITY
        self.module.on_rx_request = self._cb
        lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
        lib.pjsip_rx_data_get_info.restype = ctypes.c_void_p  # the pointer itself: read_source checks it
        lib.pjsip_rx_data_get_info.argtypes = [ctypes.c_void_p]
        lib.pjsip_endpt_respond_stateless.restype = ctypes.c_int
        lib.pjsip_endpt_respond_stateless.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_endpt_respond.restype = ctypes.c_int
        lib.pjsip_endpt_respond.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_msg_find_hdr_by_name.restype = ctypes.c_void_p
        lib.pjsip_msg_find_hdr_by_name.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_endpt_register_module.restype = ctypes.c_int
        lib.pjsip_endpt_register_module.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.endpt = lib.pjsua_get_pjsip_endpt()

    def register(self) -> None:
        status = self.lib.pjsip_endpt_register_module(ctypes.c_void_p(self.endpt), ctypes.byref(self.module))
        if status != 0:
            raise RuntimeError(f"pjsip_endpt_register_module failed with status {status}")

    def _pj_str(self, text: str) -> _PjStr:
        if text not in self._strings:
            raw = text.encode()
            self._strings[text] = (raw, _PjStr(raw, len(raw)))
        return self._strings[text][1]

    def _layout_failed(self, why: str) -> None:
        if self._layout_problem is None:
            self._layout_problem = why
            log.warning("sip_rx_source_unreadable", reason=why,
                        effect="out-of-dialog OPTIONS, SUBSCRIBE, REFER, NOTIFY, PUBLISH and MESSAGE get 403 "
                               "unless sip.allow_from allows every address")

    def _source(self, rdata: int, info: int, method: str) -> str | None:
        source, why = read_source(rdata, info, method)
        if source is None:
            self._layout_failed(why)
        return source

    def _has_replaces(self, rdata: int, info: int, method: str) -> bool:
        """Whether the parsed request carries a Replaces header. False when our view of the
        struct fails its checks (then `SipCall.onCallReplaceRequest` still refuses it, except
        while the call it names is being hung up): a pointer read from a wrong offset is never
        followed."""
        if self._source(rdata, info, method) is None:
            return False
        msg = RxData.from_address(rdata).msg_info.msg
        if not msg:
            return False
        head = _MsgHead.from_address(msg)
        name = head.method.name
        if head.type != 0 or not name.ptr or name.slen != len(method) \
                or ctypes.string_at(name.ptr, name.slen) != method.encode():
            self._layout_failed("msg_info.msg is not the request's parsed message")
            return False
        return bool(self.lib.pjsip_msg_find_hdr_by_name(msg, ctypes.byref(self._pj_str("Replaces")), None))

    def _on_rx_request(self, rdata: int) -> int:
        try:
            info_ptr = self.lib.pjsip_rx_data_get_info(rdata)
            info = ctypes.string_at(info_ptr) if info_ptr else b""
            if not info.startswith(_REQUEST_PREFIX):
                return 0  # PJ_FALSE: not ours, the next module handles it
            method = info[len(_REQUEST_PREFIX):].split(b"/", 1)[0].decode("ascii", "replace")
            if method != "INVITE" and method not in GUARDED:
                return 0
            cfg = self.cfg
            source = self._source(rdata, info_ptr, method) if method in GUARDED else None
            replaces = method == "INVITE" and self._has_replaces(rdata, info_ptr, method)
            answer = verdict(method, source, cfg.allow_from, unavailable_reason(self.admission) if method == "OPTIONS"
                             else None, replaces)
            if answer is None:
                return 0  # pjsua answers as usual
            code, phrase, counted = answer
            if counted is None:
                self.answered_503 += 1
            else:  # counted before the answer goes out: whoever got it sees it counted
                self.metrics.sip_refused_requests.labels(method=method, reason=counted).inc()
                log.debug("sip_request_refused", method=method, status=code, reason=counted)
            text = ctypes.byref(self._pj_str(phrase))
            if method == "INVITE":  # statefully: the transaction absorbs retransmissions and the ACK
                self.lib.pjsip_endpt_respond(self.endpt, None, rdata, code, text, None, None, None)
            else:
                self.lib.pjsip_endpt_respond_stateless(self.endpt, rdata, code, text, None, None)
            return 1  # PJ_TRUE: handled
        except Exception:  # never let an exception cross into C; pjsua then answers as before
            log.exception("sip_request_filter_failed")
            return 0


_installed: list[RequestFilter] = []  # outlive the endpoint: pjsip touches the struct in libDestroy


def install(cfg, metrics: Metrics, admission: Admission) -> RequestFilter:
    """Register the module on the running pjsua library (SIP thread, after libStart). Fails
    closed: without it OPTIONS would answer 200 to anyone (a capacity oracle), presence
    SUBSCRIBEs 200 and INVITE/Replaces would be left to pjsua, so a library that does not
    export what it needs stops the SIP endpoint's start (RuntimeError, naming why)."""
    try:
        import pjsua2

        lib = ctypes.CDLL(pjsua2._pjsua2.__file__)
        responder = RequestFilter(cfg, metrics, admission, lib)
        responder.register()
    except (AttributeError, OSError, RuntimeError) as exc:
        raise RuntimeError(f"the SIP request filter cannot be installed ({exc}): refusing to run SIP without "
                           "it (OPTIONS from any source, presence SUBSCRIBE 200)") from None
    _installed.append(responder)
    log.debug("sip_request_filter", priority=PRIORITY)
    return responder
