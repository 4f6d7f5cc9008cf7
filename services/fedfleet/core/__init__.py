"""Pure FL logic: no I/O inside; a clock value and a numpy Generator are passed in."""
