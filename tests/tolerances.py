"""Float tolerances for comparing native kernels with their float64 references, kept in one place."""

# float32 kernel vs float64 reference, elementwise (dequantized weights, forward activations)
F32_RTOL = 1e-5
F32_ATOL = 1e-6
# reductions over many float32 terms (Gram matrices, losses, gradients)
REDUCE_RTOL = 1e-4
REDUCE_ATOL = 1e-5
# finite-difference gradient checks in float64
FD_RTOL = 1e-4
FD_ATOL = 1e-6
# packed-format products (hiquant.packed_matmul) vs the float64 twin, relative to
# hiquant._reference.packed_matmul.error_bound (about 16 float32 epsilons)
PACKED_RTOL = 2e-6
# the measured sensitivity matrix with evaluations stacked along the batch axis vs one at a time:
# an entry combines up to four mean losses whose float32 rounding changes with the batch's shape;
# |ΔM| <= MEASURED_M_RTOL · L_0 (the unperturbed loss). Measured: 4e-8 on a tiny model.
MEASURED_M_RTOL = 1e-6
