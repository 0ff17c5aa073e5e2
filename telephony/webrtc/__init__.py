"""Browser calls over WebRTC (aiortc), with the call page served by the same app."""
