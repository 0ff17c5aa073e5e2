"""Call endpoints (WebRTC, SIP): decode and resample call audio at the edge, into call sessions."""
