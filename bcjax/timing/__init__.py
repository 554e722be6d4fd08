"""Where the time goes: compile, steps, input, compute vs collectives."""
