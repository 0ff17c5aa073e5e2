"""Phone lines over SIP with pjsua2 (PJSIP's own binding), built by scripts/build_pjsua2.sh."""
