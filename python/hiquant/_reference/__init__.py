"""Float64 NumPy references, one per native concern. Never imports hiquant._core: tests compare
the native kernels with these independent implementations."""
