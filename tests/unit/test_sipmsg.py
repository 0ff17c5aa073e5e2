"""Reading an INVITE: dialled and calling numbers, source address, the ACL (no pjsua2 needed)."""

from __future__ import annotations

from telephony.sip.sipmsg import allowed, caller_user, dialled_user, source_ip


def test_sipmsg_parsing():
    msg = "INVITE sip:+14155550100@10.0.0.1;user=phone SIP/2.0\r\nTo: <sip:other@x>\r\n\r\n"
    assert dialled_user(msg) == "+14155550100"
    assert dialled_user("INVITE sip:10.0.0.1 SIP/2.0\r\nTo: \"A\" <sip:1001@pbx>\r\n") == "1001"
    assert dialled_user("INVITE tel:+442079460000 SIP/2.0\r\n") == "+442079460000"
    assert source_ip("127.0.0.1:5062") == "127.0.0.1" and source_ip("[::1]:5060") == "::1"
    assert allowed("127.0.0.1", ["127.0.0.0/8"]) and not allowed("192.0.2.1", ["127.0.0.0/8", "10.0.0.0/8"])
    assert caller_user('INVITE sip:1001@x SIP/2.0\r\nFrom: "Omar" <sip:+14155550111@pbx>;tag=1\r\n') == "+14155550111"
    assert caller_user("INVITE sip:1001@x SIP/2.0\r\nf: <tel:+442079460000>;tag=9\r\n") == "+442079460000"
    assert caller_user("INVITE sip:1001@x SIP/2.0\r\nFrom: <sip:pbx.example.com>\r\n") is None
