"""Shared test utilities: an fp64 reference (``reference``), a multi-process gloo runner
(``multiproc``), log capture inside spawned ranks (``logs``), global-state reset (``state``)
and pure-torch stand-ins for optional kernel packages (``fake_kernels``)."""
