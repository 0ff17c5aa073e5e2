"""PersonaPlex telephony voice agent: streaming full-duplex engine, personas, scheduler, server."""

import os as _os

# moshi compiles its modules with torch.compile on first use unless told not to; on CPU that
# costs ~20 s per process for no steady-state gain, so default it off (the user can override).
_os.environ.setdefault("NO_TORCH_COMPILE", "1")

__version__ = "0.1.0"
