"""MRI physics: centred FFT, composable linear operators (SENSE = mask @ FFT @ coils), masks, ESPIRiT coil maps."""
