"""Device mesh, multi-process start-up and data-parallel step strategies."""
