"""One module per op: argument checks, the custom op with its autograd, and the Triton launchers."""
