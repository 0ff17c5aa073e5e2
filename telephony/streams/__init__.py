"""Carrier media streams (Twilio, Telnyx) over one WebSocket transport; each carrier file is its wire format."""
