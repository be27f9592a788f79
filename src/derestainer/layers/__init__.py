"""Neural-network building blocks (modulated convolution, SimAM, conv blocks)."""
