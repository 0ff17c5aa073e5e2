"""Out-of-dialog SIP OPTIONS answered 503 while the agent drains or has no free call slot.

A SIP proxy in front of many agents (Kamailio's dispatcher, see deploy/kamailio/) probes each
agent with OPTIONS and keeps only those answering 2xx in rotation. pjsua answers every OPTIONS
with 200 by itself (its `mod-pjsua-options` module) and pjsua2 has no callback for it, so a
draining or full agent would look healthy and only refuse the INVITE itself (the proxy then
fails over, one round trip later).

pjsua2's Python binding does not wrap `pjsip_module`, but the shared library it loads exports
pjsip's C API. We register a small pjsip module through ctypes, at a priority just before
pjsua's OPTIONS handler (and after the dialog layer, so in-dialog requests never reach it):
when the agent drains or is full it answers OPTIONS statelessly with 503 (reason phrase
"Draining" or "Full") and pjsua's handler never sees the request; otherwise it passes it on
and pjsua answers 200 as before. No pjproject change, no rebuild.

Everything here runs on the SIP thread (the module is called from `libHandleEvents`).
"""

from __future__ import annotations

import ctypes

import structlog

log = structlog.get_logger(__name__)

# pjsip/sip_module.h: PJSIP_MOD_PRIORITY_UA_PROXY_LAYER (32) < DIALOG_USAGE (48) < APPLICATION (64).
# Below APPLICATION: we see the request before pjsua's OPTIONS handler; above the dialog layer:
# requests inside a dialog were consumed before us.
PRIORITY = 63
_REQUEST_PREFIX = b"Request msg OPTIONS/"  # pjsip_rx_data_get_info(): "Request msg OPTIONS/cseq=.."

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


def unavailable_reason(runtime) -> str | None:
    """Why a proxy should not send this agent a new call right now ("Draining", "Full"), or None."""
    if runtime.draining:
        return "Draining"
    sch = runtime.scheduler
    if sch is None or not sch.running:
        return "Starting"
    if sch.capacity_left <= 0:
        return "Full"
    return None


class OptionsResponder:
    """The registered pjsip module; keep it alive as long as the pjsua library (pjsip writes into
    the struct and calls the callback until libDestroy unregisters it)."""

    def __init__(self, runtime, lib: ctypes.CDLL):
        self.runtime = runtime
        self.lib = lib
        self.answered_503 = 0
        self._name = b"mod-personaplex-options"
        self._reasons: dict[str, tuple[bytes, _PjStr]] = {}
        self._cb = _RX_REQUEST(self._on_rx_request)  # referenced: ctypes must not free the thunk
        self.module = _PjsipModule()
        self.module.name = _PjStr(self._name, len(self._name))
        self.module.id = -1
        self.module.priority = PRIORITY
        self.module.on_rx_request = self._cb
        lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
        lib.pjsip_rx_data_get_info.restype = ctypes.c_char_p
        lib.pjsip_rx_data_get_info.argtypes = [ctypes.c_void_p]
        lib.pjsip_endpt_respond_stateless.restype = ctypes.c_int
        lib.pjsip_endpt_respond_stateless.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_endpt_register_module.restype = ctypes.c_int
        lib.pjsip_endpt_register_module.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.endpt = lib.pjsua_get_pjsip_endpt()

    def register(self) -> None:
        status = self.lib.pjsip_endpt_register_module(ctypes.c_void_p(self.endpt), ctypes.byref(self.module))
        if status != 0:
            raise RuntimeError(f"pjsip_endpt_register_module failed with status {status}")

    def _reason(self, text: str) -> _PjStr:
        if text not in self._reasons:
            raw = text.encode()
            self._reasons[text] = (raw, _PjStr(raw, len(raw)))
        return self._reasons[text][1]

    def _on_rx_request(self, rdata: int) -> int:
        try:
            info = self.lib.pjsip_rx_data_get_info(rdata) or b""
            if not info.startswith(_REQUEST_PREFIX):
                return 0  # PJ_FALSE: not ours, the next module handles it
            reason = unavailable_reason(self.runtime)
            if reason is None:
                return 0  # pjsua answers 200 as usual
            self.lib.pjsip_endpt_respond_stateless(self.endpt, rdata, 503, ctypes.byref(self._reason(reason)),
                                                   None, None)
            self.answered_503 += 1
            return 1  # PJ_TRUE: handled
        except Exception:  # never let an exception cross into C; pjsua then answers 200
            log.exception("sip_options_hook_failed")
            return 0


_installed: list[OptionsResponder] = []  # outlive the endpoint: pjsip touches the struct in libDestroy


def install(runtime) -> OptionsResponder | None:
    """Register the OPTIONS module on the running pjsua library (SIP thread, after libStart).
    Returns None (and logs why) when the library does not export what it needs: pjsua then
    answers 200 as before and a proxy relies on INVITE failover."""
    try:
        import pjsua2

        lib = ctypes.CDLL(pjsua2._pjsua2.__file__)
        responder = OptionsResponder(runtime, lib)
        responder.register()
    except (AttributeError, OSError, RuntimeError) as exc:
        log.warning("sip_options_hook_unavailable", reason=str(exc),
                    effect="OPTIONS get 200 while draining or full; a proxy fails over on the INVITE's 503")
        return None
    _installed.append(responder)
    log.debug("sip_options_responder", priority=PRIORITY)
    return responder
