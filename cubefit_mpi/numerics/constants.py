"""Physical constants (local)."""

SPEED_OF_LIGHT_KMS = 299792.458     # km/s
