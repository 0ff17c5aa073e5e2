"""This layer runs torch in the test process: it gets the server's thread rule."""

from tests.support.threads import torch_threads  # noqa: F401  (autouse, session)
