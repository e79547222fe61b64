"""Tools for the scripts and benchmarks only (the product never imports them): the memory plan, the real
model shapes on meta tensors, and the demo corpus's answers."""
