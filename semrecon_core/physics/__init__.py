"""MRI physics: centred FFT, the multicoil SENSE operator, conjugate gradient, masks, ESPIRiT coil maps."""
