"""The server process: configuration, runtime (model, personas, scheduler, endpoints), HTTP."""
